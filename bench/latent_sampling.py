"""Latent against pixel-space diffusion on the digits: the cost of one sampling step (issue 6).

Both pipelines are built exactly as the shipped recipes build them (untrained weights: the cost of a step
does not depend on them): `ddpm-digits` (a 1.1 M-parameter UNet on 16x16x1 pixels) and `ldm-digits` (a UNet
on the 4x4x4 latents of the `vae-digits` autoencoder, plus one VAE decode per sample at the end). Each is run
for a whole sampling call with classifier-free guidance; the per-step cost of the latent pipeline includes
its decode, spread over the steps. Rounds alternate the two, so load on a shared machine falls on both.

    .venv/bin/python bench/latent_sampling.py [--batch 64] [--steps 25] [--rounds 7] [--write-results]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import yaml
from diffusers import DDIMScheduler, UNet2DModel

from hfx.models.vae import HfxVAEConfig, HfxVAEModel
from hfx.pipelines import ClassConditionalPipeline, LatentDiffusionPipeline
from hfx.resources import training_config
from hfx.trainers.tasks.diffusion import DEFAULT_UNET

SECTION = "## Latent vs pixel-space sampling (bench/latent_sampling.py)"
RESULTS = Path(__file__).with_name("RESULTS.md")


def recipe(name: str) -> dict:
    return yaml.safe_load(training_config(name).read_text())


def build() -> tuple[ClassConditionalPipeline, LatentDiffusionPipeline]:
    torch.manual_seed(0)
    names = [str(i) for i in range(10)]
    pixel_unet = UNet2DModel(**{**DEFAULT_UNET, **recipe("ddpm-digits")["task_options"].get("unet", {})},
                             sample_size=16, in_channels=1, out_channels=1, num_class_embeds=11)
    vae = HfxVAEModel(HfxVAEConfig(**recipe("vae-digits")["task_options"]["model"], image_size=16)).eval()
    factor = vae.config.downsample_factor
    latent_unet = UNet2DModel(**{**DEFAULT_UNET, **recipe("ldm-digits")["task_options"]["unet"]},
                              sample_size=16 // factor, in_channels=vae.config.latent_channels,
                              out_channels=vae.config.latent_channels, num_class_embeds=11)
    pixel = ClassConditionalPipeline(pixel_unet.eval(), DDIMScheduler(), class_names=names)
    latent = LatentDiffusionPipeline(vae, latent_unet.eval(), DDIMScheduler(clip_sample=False), class_names=names)
    for pipe in (pixel, latent):
        pipe.set_progress_bar_config(disable=True)
    return pixel, latent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pixel, latent = build()
    params = {name: sum(p.numel() for p in pipe.unet.parameters()) for name, pipe in (("pixel", pixel), ("latent", latent))}
    labels = [i % 10 for i in range(args.batch)]
    times: dict[str, list[float]] = {"pixel": [], "latent": []}
    for pipe in (pixel, latent):  # warm-up
        pipe(labels[:2], guidance_scale=2.0, num_inference_steps=2, output_type="pt")
    for round_index in range(args.rounds):
        order = [("pixel", pixel), ("latent", latent)]
        for name, pipe in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            pipe(labels, guidance_scale=2.0, num_inference_steps=args.steps, output_type="pt",
                 generator=torch.Generator().manual_seed(round_index))
            times[name].append((time.perf_counter() - start) / args.steps)
    pairs = [lat / pix for lat, pix in zip(times["latent"], times["pixel"])]
    med = {name: statistics.median(values) for name, values in times.items()}
    table = "\n".join([
        "| pipeline | UNet parameters | sample shape | median time per step (ms) |", "|---|---:|---|---:|",
        f"| pixel (ddpm-digits) | {params['pixel']:,} | 1x16x16 | {1e3 * med['pixel']:.1f} |",
        f"| latent (ldm-digits, incl. VAE decode) | {params['latent']:,} | 4x4x4 | {1e3 * med['latent']:.1f} |",
    ])
    ratio = statistics.median(pairs)
    text = (f"{SECTION}\n\n- Date: {datetime.date.today()}; machine: {platform.machine()} CPU, {args.threads} torch thread(s), "
            f"torch {torch.__version__}; no GPU.\n- Command: `.venv/bin/python bench/latent_sampling.py --batch {args.batch} "
            f"--steps {args.steps} --rounds {args.rounds} --write-results`\n- Batch {args.batch}, {args.steps} DDIM steps, "
            f"classifier-free guidance 2 (one batched UNet call of 2B per step), {args.rounds} alternating rounds.\n\n"
            f"{table}\n\n**latent / pixel time per step: {ratio:.3f}** (median of round pairs; target < 1).\n")
    print(text)
    if args.write_results:
        current = RESULTS.read_text()
        pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
        RESULTS.write_text(pattern.sub(text.rstrip() + "\n", current) if pattern.search(current)
                           else current.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
