"""CycleGAN on the digits' stroke domains, measured against the do-nothing baseline, and sampling speed of the
one-forward-pass pipelines against the diffusion demo's pipeline.

Train the evaluator and the recipe first:

    OMP_NUM_THREADS=1 hfx train --threads 1 classify-digits-strokes
    OMP_NUM_THREADS=1 hfx train --threads 1 cyclegan-digits task_options.evaluator=outputs/classify-digits-strokes/final
    OMP_NUM_THREADS=1 python bench/cyclegan_experiments.py --part translate
    OMP_NUM_THREADS=1 python bench/cyclegan_experiments.py --part speed --gan outputs/gan-digits/final \\
        --diffusion outputs/demo/pipeline

``translate``: every test image of each domain through ``CycleGANPipeline`` (the run's final generators) and
back; in the evaluator's penultimate features and by the ``stroke_width`` domain measure: the share still
classified as its digit (goal >= 95 %), the share on the target domain's side of the midpoint of the two real
domains' median stroke widths (goal >= 90 %), FID against the real test images of the target domain, and the
cycle L1 (on [-1, 1]). The same numbers for the untranslated images (the do-nothing baseline) and for the real
target images (the ceiling). ``speed``: images/s of GANPipeline, CycleGANPipeline and the diffusion demo's
ClassConditionalPipeline at its default steps, batch 64, alternating rounds in one process (median of rounds).
Writes ``outputs/cyclegan_experiments/results.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def test_domains(image_size: int):
    """The test split of digits-strokes: {domain id: (images (N, 1, S, S) in [-1, 1], labels (N,))}."""
    from hfx.data import digits_strokes

    test = digits_strokes(image_size=image_size)["test"]
    images = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32))[None] / 127.5 - 1 for im in test["image"]])
    labels, domains = torch.tensor(test["label"]), torch.tensor(test["domain"])
    return {d: (images[domains == d], labels[domains == d]) for d in (0, 1)}


def translate(args) -> dict:
    from hfx.metrics import frechet_distance, stroke_width
    from hfx.metrics.classifier import TrainedImageClassifier
    from hfx.pipelines import CycleGANPipeline

    pipe = CycleGANPipeline.from_pretrained(Path(args.run) / "final")
    classifier = TrainedImageClassifier(args.evaluator)
    domains = test_domains(pipe.generator_ab.config.sample_size)
    widths = {d: stroke_width(x) for d, (x, _) in domains.items()}
    middle = (widths[0].median() + widths[1].median()) / 2
    names = pipe.domain_names

    def features_and_predictions(x):
        f, logits = classifier.features_and_logits(x)
        return f, logits.argmax(1)

    results = {}
    for source, target, direction in ((0, 1, "a_to_b"), (1, 0, "b_to_a")):
        x, labels = domains[source]
        there, back = ((pipe.generator_ab, pipe.generator_ba) if direction == "a_to_b"
                       else (pipe.generator_ba, pipe.generator_ab))
        with torch.no_grad():
            fake = there(x).sample.clamp(-1, 1)
            rec = back(fake).sample.clamp(-1, 1)
        target_features, _ = features_and_predictions(domains[target][0])
        sign = 1 if target == 1 else -1  # thick (B) has the wider strokes
        rows = {}
        for what, images in (("translated", fake), ("untranslated (baseline)", x), ("real target", domains[target][0])):
            features, predicted = features_and_predictions(images)
            truth = domains[target][1] if what == "real target" else labels
            rows[what] = {
                "class_kept": float((predicted == truth).double().mean()),
                "in_target": float(((stroke_width(images) - middle) * sign > 0).double().mean()),
                "fid_to_target": frechet_distance(features, target_features) if what != "real target" else 0.0,
                "n": len(images),
            }
        rows["translated"]["cycle_l1"] = float((rec - x).abs().mean())
        results[f"{names[source]}_to_{names[target]}"] = rows
    return results


def speed(args) -> dict:
    from hfx.pipelines import ClassConditionalPipeline, CycleGANPipeline, GANPipeline

    torch.set_num_threads(1)
    pipes = {}
    if args.gan:
        gan = GANPipeline.from_pretrained(args.gan)
        pipes["GANPipeline"] = (lambda p=gan: p(**({"class_labels": [i % p.num_classes for i in range(64)]}
                                                   if p.num_classes else {"batch_size": 64}), output_type="pt"))
    if args.run:
        cyc = CycleGANPipeline.from_pretrained(Path(args.run) / "final")
        side = cyc.generator_ab.config.sample_size
        batch = torch.rand(64, 1, side, side)
        pipes["CycleGANPipeline"] = lambda p=cyc: p(batch, output_type="pt")
    if args.diffusion:
        diff = ClassConditionalPipeline.from_pretrained(args.diffusion)
        diff.set_progress_bar_config(disable=True)
        steps = args.diffusion_steps
        pipes[f"ClassConditionalPipeline ({steps} steps)"] = (
            lambda p=diff: p([i % p.num_classes for i in range(64)], num_inference_steps=steps, output_type="pt"))
    times = {name: [] for name in pipes}
    for call in pipes.values():  # warm-up
        call()
    for _ in range(args.rounds):
        for name, call in pipes.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: {"images_per_s": 64 / statistics.median(t), "seconds_per_batch_of_64": statistics.median(t)}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=("translate", "speed"), default=["translate"])
    parser.add_argument("--run", default="outputs/cyclegan-digits")
    parser.add_argument("--evaluator", default="outputs/classify-digits-strokes/final")
    parser.add_argument("--gan", default=None, help="a GANPipeline folder for the speed part")
    parser.add_argument("--diffusion", default=None, help="the demo's ClassConditionalPipeline folder for the speed part")
    parser.add_argument("--diffusion-steps", type=int, default=50, help="the demo's default steps (50)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="outputs/cyclegan_experiments")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if "translate" in args.part:
        results["translate"] = translate(args)
        print("| direction | images | class kept | in target domain | FID to target | cycle L1 |\n|---|---|---|---|---|---|")
        for direction, rows in results["translate"].items():
            for what, r in rows.items():
                cycle = f"{r['cycle_l1']:.4f}" if "cycle_l1" in r else "-"
                print(f"| {direction} | {what} | {100 * r['class_kept']:.1f} % | {100 * r['in_target']:.1f} % | "
                      f"{r['fid_to_target']:.2f} | {cycle} |")
    if "speed" in args.part:
        results["speed"] = speed(args)
        print("| pipeline | images/s (batch 64, 1 thread) |\n|---|---|")
        for name, r in results["speed"].items():
            print(f"| {name} | {r['images_per_s']:,.0f} |")
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
