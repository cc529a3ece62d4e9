"""The GAN recipes measured in the digits evaluator's features: FID/KID, mode coverage, conditional accuracy,
StyleGAN's truncation curve and a style-mixing grid, the FID curves of the loss variants, sampling speed.

Train the evaluator and the recipes first (each prints its wall time with /usr/bin/time), e.g.:

    OMP_NUM_THREADS=1 hfx train --threads 1 classify-digits output_dir=outputs/gan-evaluator
    for r in gan-digits cgan-digits wgan-gp-digits stylegan-digits; do
        OMP_NUM_THREADS=1 hfx train --threads 1 $r task_options.evaluator=outputs/gan-evaluator/final
    done
    OMP_NUM_THREADS=1 python bench/gan_experiments.py --evaluator outputs/gan-evaluator/final

For every run folder given (default: the four recipes' ``outputs/<recipe>``) it loads ``final/`` as a
GANPipeline (the EMA generator) and draws N = 1000 samples at a fixed seed (100 per class for a conditional
model). Scores, in the evaluator's penultimate features (not Inception's: comparable only with scores in the same
features), against the 360 held-out test digits: FID (biased by N: the real train-vs-test FID at the same N is the
floor), KID (100 subsets), the class histogram of the evaluator's predictions with its KL to uniform and the number
of classes given >= 1 % of the samples (goal: all ten, KL <= 0.05), conditional accuracy (goal >= 95 %), and the
evaluator's mean confidence (max softmax, a fidelity proxy). Writes ``outputs/gan_experiments/``: results.json,
results.md, fid_curves.png (eval/fid of each run against generator steps), stylegan_truncation.png and
stylegan_mixing.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

RECIPES = ("gan-digits", "cgan-digits", "wgan-gp-digits", "stylegan-digits")
TRUNCATION = (0.5, 0.7, 0.85, 1.0)


def load_test_and_train(image_size: int, seed: int, n_train: int):
    """The digits test split (all of it) and ``n_train`` train images, as (N, 1, S, S) tensors in [-1, 1]."""
    from hfx.data import builtin_dataset

    digits = builtin_dataset("digits", image_size=image_size, seed=0)

    def tensor(images):
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32))[None] / 127.5 - 1 for im in images])

    train = list(digits["train"]["image"])
    picks = np.random.default_rng(seed).choice(len(train), size=min(n_train, len(train)), replace=False)
    return tensor(digits["test"]["image"]), tensor([train[i] for i in picks])


def score(classifier, images: torch.Tensor, real_features: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """FID, KID, class histogram, KL to uniform, coverage, (conditional) accuracy and confidence of ``images``."""
    from hfx.metrics import frechet_distance, kernel_inception_distance

    features, logits = [], []
    for chunk in images.split(500):
        f, lg = classifier.features_and_logits(chunk)
        features.append(f)
        logits.append(lg)
    features, logits = torch.cat(features), torch.cat(logits)
    predicted = logits.argmax(1)
    share = torch.bincount(predicted, minlength=10).double() / len(predicted)
    kid = kernel_inception_distance(features, real_features, subsets=100, subset_size=min(len(features), len(real_features)))
    out = {"n": len(images), "fid": frechet_distance(features, real_features), "kid": kid.mean, "kid_std": kid.std,
           "class_histogram": [round(float(s), 4) for s in share],
           "class_kl_to_uniform": float(torch.where(share > 0, share * (share * 10).log(), 0.0).sum()),
           "classes_covered": int((share >= 0.01).sum()),
           "evaluator_confidence": float(logits.softmax(1).max(1).values.mean())}
    if labels is not None:
        out["conditional_accuracy"] = float((predicted == labels).double().mean())
    return out


def sample(pipe, n: int, seed: int, truncation_psi: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples in [-1, 1] at a fixed seed (``n / 10`` per class for a conditional pipeline) and their labels."""
    generator = torch.Generator().manual_seed(seed)
    if pipe.num_classes:
        labels = torch.arange(pipe.num_classes).repeat_interleave(n // pipe.num_classes)
        images = pipe(class_labels=labels, truncation_psi=truncation_psi, generator=generator, output_type="pt").images
        return images * 2 - 1, labels
    return pipe(batch_size=n, truncation_psi=truncation_psi, generator=generator, output_type="pt").images * 2 - 1, None


def fid_curves(runs: dict[str, Path], path: Path) -> dict[str, list]:
    """eval/fid of every run against generator steps (a run's step counts critic steps; G took step / n_critic)."""
    import matplotlib
    import yaml

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    fig, axis = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        n_critic = (yaml.safe_load((run / "config.yaml").read_text())["task_options"] or {}).get("n_critic", 1)
        points = [(r["step"] // n_critic, r["eval/fid"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if "eval/fid" in r]
        curves[name] = points
        if points:
            axis.plot(*zip(*points), "o-", label=name)
    axis.set(xlabel="generator steps", ylabel="FID (evaluator features, N = eval_num_samples)", yscale="log",
             title="FID during training")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return curves


def truncation_plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    psi = [p["truncation_psi"] for p in points]
    left.plot(psi, [p["fid"] for p in points], "o-")
    left.set(xlabel="truncation psi", ylabel="FID", title="fidelity and diversity vs psi")
    right.plot(psi, [p["evaluator_confidence"] for p in points], "o-", label="evaluator confidence")
    right.plot(psi, [p["class_kl_to_uniform"] for p in points], "s--", label="class KL to uniform")
    right.set(xlabel="truncation psi")
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mixing_grid(pipe, path: Path, seed: int, cutoff: int = 2) -> None:
    """The gan task's style-mixing figure (rows: coarse layers before ``cutoff`` from source A; columns: the fine
    layers from source B), enlarged to 48 px a cell."""
    from diffusers.utils import make_image_grid

    from hfx.trainers.tasks._image_tasks import to_pil_images
    from hfx.trainers.tasks.gan import style_mixing_grid

    with torch.no_grad():
        images, rows = style_mixing_grid(pipe.generator, seed=seed, cutoff=cutoff)
    make_image_grid([im.resize((48, 48), 0) for im in to_pil_images(images)], rows=rows, cols=rows).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run folders (default: outputs/<recipe> of the four GAN recipes)")
    parser.add_argument("--evaluator", default="outputs/gan-evaluator/final", help="an image-classification artifact")
    parser.add_argument("--n", type=int, default=1000, help="generated samples per setting (default 1000)")
    parser.add_argument("--n-demo", type=int, default=300,
                        help="the diffusion demo's sample size: FID is also reported at this N (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/gan_experiments")
    args = parser.parse_args()

    import hfx  # noqa: F401  (registers the pipeline)
    from hfx.metrics import frechet_distance, kernel_inception_distance
    from hfx.metrics.classifier import TrainedImageClassifier
    from hfx.pipelines import GANPipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {Path(r).name: Path(r) for r in (args.runs or [f"outputs/{name}" for name in RECIPES])}
    runs = {name: run for name, run in runs.items() if (run / "final" / "model_index.json").is_file()}
    classifier = TrainedImageClassifier(args.evaluator)
    size = classifier.preprocessing["image_size"]
    test, train = load_test_and_train(size, args.seed, args.n)
    test_features = classifier.features_and_logits(test)[0]
    train_features = classifier.features_and_logits(train)[0]
    test_logits = classifier.features_and_logits(test)[1]
    reference_kid = kernel_inception_distance(train_features, test_features, subset_size=len(test_features))
    # The demo's reference: default_rng(seed).choice of n_demo training images, as hfx.demo picks them.
    demo_train = classifier.features_and_logits(load_test_and_train(size, args.seed, args.n_demo)[1])[0]
    results = {"evaluator": args.evaluator, "evaluator_test_accuracy": None, "n_generated": args.n, "n_reference": len(test),
               "reference_train_vs_test": {"n": len(train), "fid": frechet_distance(train_features, test_features),
                                           "kid": reference_kid.mean},
               "reference_train_vs_test_at_demo_n": {"n": args.n_demo, "fid": frechet_distance(demo_train, test_features)},
               "runs": {}}
    from hfx.data import builtin_dataset

    labels = torch.tensor(builtin_dataset("digits", image_size=size, seed=0)["test"]["label"])
    results["evaluator_test_accuracy"] = float((test_logits.argmax(1) == labels).double().mean())
    results["evaluator_confidence_on_test"] = float(test_logits.softmax(1).max(1).values.mean())

    for name, run in runs.items():
        pipe = GANPipeline.from_pretrained(run / "final")
        pipe.set_progress_bar_config(disable=True)
        tick = time.perf_counter()
        images, asked = sample(pipe, args.n, args.seed)
        seconds = time.perf_counter() - tick
        entry = score(classifier, images, test_features, asked)
        # The first n_demo samples (n_demo / 10 of each class for a conditional model): FID at the demo's N.
        if asked is None:
            subset = images[:args.n_demo]
        else:
            per_class = args.n // 10
            subset = torch.cat([images[c * per_class:c * per_class + args.n_demo // 10] for c in range(10)])
        entry[f"fid_at_n{args.n_demo}"] = frechet_distance(classifier.features_and_logits(subset)[0], test_features)
        entry["images_per_s"] = args.n / seconds
        run_results = json.loads((run / "results.json").read_text())
        entry["train_seconds"] = run_results.get("train_seconds")
        entry["steps"] = run_results.get("step")
        entry["generator"] = type(pipe.generator).__name__
        entry["generator_parameters"] = sum(p.numel() for p in pipe.generator.parameters())
        if pipe.generator.supports_truncation:
            entry["truncation"] = []
            for psi in TRUNCATION:
                entry["truncation"].append({"truncation_psi": psi, **score(classifier, sample(pipe, args.n, args.seed, psi)[0],
                                                                             test_features, None)})
            truncation_plot(entry["truncation"], out / f"{name}_truncation.png")
            mixing_grid(pipe, out / f"{name}_mixing.png", args.seed)
        results["runs"][name] = entry
        print(f"{name}: FID {entry['fid']:.2f}, KID {1e3 * entry['kid']:.1f}e-3, KL {entry['class_kl_to_uniform']:.3f}, "
              f"classes {entry['classes_covered']}, accuracy {entry.get('conditional_accuracy', float('nan')):.3f}", flush=True)
    results["fid_curves"] = fid_curves(runs, out / "fid_curves.png")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table(results) + "\n")
    print(table(results))


def table(results: dict) -> str:
    ref = results["reference_train_vs_test"]
    rows = [f"N = {results['n_generated']} generated vs the {results['n_reference']} test digits, in the features of "
            f"{results['evaluator']} (test accuracy {100 * results['evaluator_test_accuracy']:.1f} %)", "",
            "| run | steps (D) | train time | FID | FID at N = 300 | KID (x1e3) | classes >= 1 % | KL to uniform | "
            "conditional accuracy | images/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in results["runs"].items():
        acc = f"{100 * e['conditional_accuracy']:.1f} %" if "conditional_accuracy" in e else "-"
        minutes = f"{e['train_seconds'] / 60:.1f} min" if e.get("train_seconds") else "-"
        small = next((v for k, v in e.items() if k.startswith("fid_at_n")), float("nan"))
        rows.append(f"| {name} | {e['steps']} | {minutes} | {e['fid']:.2f} | {small:.2f} | "
                    f"{1e3 * e['kid']:.2f} ± {1e3 * e['kid_std']:.2f} | "
                    f"{e['classes_covered']} | {e['class_kl_to_uniform']:.3f} | {acc} | {e['images_per_s']:.0f} |")
    demo = results["reference_train_vs_test_at_demo_n"]
    rows.append(f"| real train vs test (N = {ref['n']}; N = {demo['n']}) | - | - | {ref['fid']:.2f} | {demo['fid']:.2f} | "
                f"{1e3 * ref['kid']:.2f} | - | - | - | - |")
    for name, e in results["runs"].items():
        if "truncation" in e:
            rows += ["", f"{name}: truncation (fidelity vs diversity; the evaluator's confidence on the real test "
                     f"digits is {results['evaluator_confidence_on_test']:.3f})", "",
                     "| psi | FID | KID (x1e3) | classes >= 1 % | KL to uniform | evaluator confidence |",
                     "|---|---|---|---|---|---|"]
            for p in e["truncation"]:
                rows.append(f"| {p['truncation_psi']} | {p['fid']:.2f} | {1e3 * p['kid']:.2f} | {p['classes_covered']} | "
                            f"{p['class_kl_to_uniform']:.3f} | {p['evaluator_confidence']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
