"""Text-to-image on the digits-captions prompts: class and attribute accuracy, FID, against the guidance scale,
on the test captions and on the held-out attribute combinations; sampling time per image.

    OMP_NUM_THREADS=1 hfx train --threads 1 vae-digits-captions
    OMP_NUM_THREADS=1 hfx train --threads 1 classify-digits-captions
    OMP_NUM_THREADS=1 hfx train --threads 1 t2i-digits
    OMP_NUM_THREADS=1 python bench/t2i_experiments.py

For each guidance scale (0 / 1 / 3 / 5 / 7.5) one image per caption of the ``test`` split (182 captions of
combinations seen in training, other digits) and of the ``heldout`` split (178 captions of combinations never
seen in training), DDIM 25 steps, seed 0: the evaluator's class accuracy (``classify-digits-captions``), each
attribute's accuracy by its measuring program (:data:`hfx.metrics.DIGIT_ATTRIBUTES`), FID against the real
images of the same split in the evaluator's penultimate features, and the same numbers for the real images
(the ceiling). Writes ``outputs/t2i_experiments/results.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

GUIDANCE = (0.0, 1.0, 3.0, 5.0, 7.5)
ATTRIBUTES = ("size", "position", "thickness")


def latent_pipeline_seconds(steps: int, n: int = 100, guidance: float = 2.0) -> float:
    """Seconds per image of the class-conditional LatentDiffusionPipeline of ``ldm-digits`` (its UNet and the
    ``vae-digits`` VAE, at random weights: the time does not depend on them) at ``guidance``, batch ``n``."""
    from diffusers import DDIMScheduler, UNet2DModel

    from hfx.models.vae import HfxVAEConfig, HfxVAEModel
    from hfx.pipelines import LatentDiffusionPipeline

    vae = HfxVAEModel(HfxVAEConfig(image_size=16, block_out_channels=[32, 64, 64], latent_channels=4,
                                   norm_num_groups=8)).eval()
    unet = UNet2DModel(sample_size=4, in_channels=4, out_channels=4, num_class_embeds=11, block_out_channels=[64, 128],
                       down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                       layers_per_block=2, norm_num_groups=8, attention_head_dim=8).eval()
    pipe = LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=DDIMScheduler(clip_sample=False),
                                   class_names=[str(i) for i in range(10)])
    pipe.set_progress_bar_config(disable=True)
    pipe([i % 10 for i in range(n)], guidance_scale=guidance, num_inference_steps=2)  # warm-up
    start = time.perf_counter()
    pipe([i % 10 for i in range(n)], guidance_scale=guidance, num_inference_steps=steps,
         generator=torch.Generator().manual_seed(0))
    return (time.perf_counter() - start) / n


def main() -> None:
    from hfx.data import digits_captions
    from hfx.metrics import DIGIT_ATTRIBUTES, frechet_distance
    from hfx.metrics.classifier import TrainedImageClassifier
    from hfx.pipelines import TextToImagePipeline
    from hfx.trainers.tasks.text_to_image import score_samples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="outputs/t2i-digits")
    parser.add_argument("--evaluator", default="outputs/classify-digits-captions/final")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=list(GUIDANCE))
    parser.add_argument("--out", default="outputs/t2i_experiments")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = TextToImagePipeline.from_pretrained(Path(args.run) / "final")
    pipe.set_progress_bar_config(disable=True)
    evaluator = TrainedImageClassifier(args.evaluator)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    data = digits_captions(canvas_size=side)
    results: dict = {"steps": args.steps, "splits": {}}
    for split in ("test", "heldout"):
        rows = data[split]
        real = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32))[None] / 127.5 - 1 for im in rows["image"]])
        real_features, real_logits = evaluator.features_and_logits(real)
        labels = torch.tensor(rows["label"])
        table = {"real": {"class_accuracy": float((real_logits.argmax(1) == labels).double().mean()), "fid": 0.0,
                          **{f"{a}_accuracy": float((torch.as_tensor(DIGIT_ATTRIBUTES[a][0](real)) ==
                                                     torch.tensor(rows[a])).double().mean()) for a in ATTRIBUTES}}}
        for scale in args.guidance:
            start = time.perf_counter()
            scored = score_samples(pipe, list(rows["text"]), list(rows["label"]), {a: list(rows[a]) for a in ATTRIBUTES},
                                   evaluator, scale, args.steps, seed=0)
            seconds = time.perf_counter() - start
            table[f"{scale:g}"] = {k: v for k, v in scored.items() if k.endswith("accuracy")}
            table[f"{scale:g}"]["fid"] = frechet_distance(scored["features"], real_features)
            table[f"{scale:g}"]["seconds_per_image"] = seconds / len(rows)
            print(split, scale, table[f"{scale:g}"], flush=True)
        results["splits"][split] = {"n": len(rows), "table": table}
    results["latent_class_conditional_seconds_per_image"] = latent_pipeline_seconds(args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("| split | guidance | class | size | position | thickness | FID | s / image |\n|---|---|---|---|---|---|---|---|")
    for split, entry in results["splits"].items():
        for scale, r in entry["table"].items():
            spi = f"{r['seconds_per_image']:.3f}" if "seconds_per_image" in r else "-"
            print(f"| {split} (N = {entry['n']}) | {scale} | {100 * r['class_accuracy']:.1f} % | "
                  f"{100 * r['size_accuracy']:.1f} % | {100 * r['position_accuracy']:.1f} % | "
                  f"{100 * r['thickness_accuracy']:.1f} % | {r['fid']:.2f} | {spi} |")
    print(f"class-conditional latent pipeline (ldm-digits, guidance 2): "
          f"{results['latent_class_conditional_seconds_per_image']:.4f} s / image")


if __name__ == "__main__":
    main()
