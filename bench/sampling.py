"""Sampling cost of ClassConditionalPipeline against diffusers' own pipelines, at equal UNet and steps.

Two ratios (issue 5):
  1. guided / unguided: ClassConditionalPipeline with classifier-free guidance (conditional and null halves in
     one batched UNet call) over diffusers DDIMPipeline / DDPMPipeline (no guidance, the same UNet without its
     class embedding). CFG doubles the UNet batch, so the target is <= 2.05.
  2. batched / two passes: the pipeline's one batched UNet call per step over the same pipeline running the
     conditional and null UNet calls one after the other. Target <= 0.65.

For context the UNet alone is timed at batch B and 2B (the same number of calls): on a compute-bound device
UNet(2B) / UNet(B) is the floor of guided / unguided, and UNet(2B) / (2 UNet(B)) that of batched / two passes.

Every variant is timed once per round, rounds interleaved, so load from other processes on a shared machine
falls on all variants alike. Each ratio is given from the medians and from the minimums (the least disturbed
run of each variant, the better estimate of the intrinsic cost when the machine is busy).

    .venv/bin/python bench/sampling.py                      # prints a markdown table
    .venv/bin/python bench/sampling.py --write-results      # and replaces its section of bench/RESULTS.md
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
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from hfx.pipelines import ClassConditionalPipeline

SECTION = "## Class-conditional sampling (bench/sampling.py)"
RESULTS = Path(__file__).with_name("RESULTS.md")
NUM_CLASSES = 10

# The feasibility model: 1.1 M parameters, channels 32/64/64, one attention level, 16x16 digits.
UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
)


class TwoPassPipeline(ClassConditionalPipeline):
    """The same pipeline with classifier-free guidance as two UNet calls per step (the un-batched way)."""

    def _guided_model_output(self, model_input, t, labels, guidance_scale, guidance_rescale):
        cond = self.unet(model_input, t, class_labels=labels).sample
        uncond = self.unet(model_input, t, class_labels=torch.full_like(labels, self.null_class_id)).sample
        return uncond + guidance_scale * (cond - uncond)


def build(device: str):
    torch.manual_seed(0)
    unet = UNet2DModel(**UNET_CONFIG, num_class_embeds=NUM_CLASSES + 1).eval().to(device)
    # diffusers' pipelines never pass class labels, so their UNet is the same network without the embedding.
    plain = UNet2DModel(**UNET_CONFIG).eval().to(device)
    missing, unexpected = plain.load_state_dict(unet.state_dict(), strict=False)
    assert not missing and unexpected == ["class_embedding.weight"], (missing, unexpected)
    schedulers = {
        "ddim": DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        "ddpm": DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
    }
    pipes = {}
    for name, scheduler in schedulers.items():
        anchor = (DDIMPipeline if name == "ddim" else DDPMPipeline)(unet=plain, scheduler=scheduler)
        pipes[f"diffusers {type(anchor).__name__} (unguided)"] = ("anchor", anchor, name)
        pipes[f"ClassConditionalPipeline {name} CFG batched"] = ("batched", ClassConditionalPipeline(unet, scheduler), name)
        pipes[f"ClassConditionalPipeline {name} CFG two passes"] = ("two-pass", TwoPassPipeline(unet, scheduler), name)
    for _, pipe, _ in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


@torch.no_grad()
def time_unet(unet: UNet2DModel, batch: int, steps: int, device: str) -> float:
    """Seconds for ``steps`` UNet forward passes at ``batch`` images, nothing else."""
    sample = torch.randn((batch, 1, 16, 16), device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    start = time.perf_counter()
    for t in range(steps):
        unet(sample, 999 - t, class_labels=labels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_once(kind: str, pipe, batch: int, steps: int, guidance: float, device: str) -> float:
    generator = torch.Generator(device).manual_seed(0)
    start = time.perf_counter()
    if kind == "anchor":
        pipe(batch_size=batch, num_inference_steps=steps, generator=generator, output_type="np")
    else:
        labels = [i % NUM_CLASSES for i in range(batch)]
        pipe(labels, guidance_scale=guidance, num_inference_steps=steps, generator=generator, output_type="np")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,16,64", help="comma-separated images per call")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps for every pipeline")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write-results", action="store_true", help=f"replace '{SECTION}' in {RESULTS.name}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pipes = build(args.device)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for kind, pipe, _ in pipes.values():  # warm-up: allocator, kernels, lazy inits
            run_once(kind, pipe, batch, 2, args.guidance, args.device)
        times = {name: [] for name in [*pipes, "unet B", "unet 2B"]}
        unet = next(pipe.unet for kind, pipe, _ in pipes.values() if kind == "batched")
        for _ in range(args.rounds):
            for name, (kind, pipe, _) in pipes.items():
                times[name].append(run_once(kind, pipe, batch, args.steps, args.guidance, args.device))
            times["unet B"].append(time_unet(unet, batch, args.steps, args.device))
            times["unet 2B"].append(time_unet(unet, 2 * batch, args.steps, args.device))
        for scheduler in ("ddim", "ddpm"):
            anchor, batched, two_pass = (
                times[next(n for n, (k, _, s) in pipes.items() if k == kind and s == scheduler)]
                for kind in ("anchor", "batched", "two-pass")
            )
            rows.append((batch, scheduler, anchor, batched, two_pass, times["unet B"], times["unet 2B"]))
            print(f"batch {batch:>3} {scheduler}: unguided {_fmt(anchor)}, CFG batched {_fmt(batched)}, "
                  f"CFG two passes {_fmt(two_pass)}", flush=True)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    lines = [
        SECTION,
        "",
        f"{datetime.date.today().isoformat()}, {device_name} ({torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}. UNet2DModel {sum(p.numel() for p in pipes[next(iter(pipes))][1].unet.parameters()) / 1e6:.2f} M "
        f"params (channels 32/64/64, attention at 4x4), 16x16x1, {args.steps} steps, guidance {args.guidance}, "
        f"{args.rounds} interleaved rounds; times are median (min) seconds per pipeline call, ratios are "
        f"median-based (min-based).",
        "",
        "| batch | scheduler | diffusers unguided | CFG batched | CFG two passes | "
        "guided / unguided (target <= 2.05) | batched / two passes (target <= 0.65) | UNet alone 2B / B |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, scheduler, anchor, batched, two_pass, unet_b, unet_2b in rows:
        lines.append(f"| {batch} | {scheduler} | {_fmt(anchor)} | {_fmt(batched)} | {_fmt(two_pass)} | "
                     f"{_ratio(batched, anchor)} | {_ratio(batched, two_pass)} | {_ratio(unet_2b, unet_b)} |")
    lines += ["", "Command: `.venv/bin/python bench/sampling.py " + " ".join(_argv_echo(args)) + "`", ""]
    table = "\n".join(lines)
    print("\n" + table)
    if args.write_results:
        text = RESULTS.read_text()
        pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"section {SECTION!r} not found in {RESULTS}")
        RESULTS.write_text(pattern.sub(lambda _: table.rstrip("\n") + "\n", text, count=1))
        print(f"updated {RESULTS}")


def _fmt(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} ({min(times):.3f})"


def _ratio(numerator: list[float], denominator: list[float]) -> str:
    median = statistics.median(numerator) / statistics.median(denominator)
    return f"{median:.2f} ({min(numerator) / min(denominator):.2f})"


def _argv_echo(args: argparse.Namespace) -> list[str]:
    echo = [f"--batch-sizes {args.batch_sizes}", f"--steps {args.steps}", f"--guidance {args.guidance}",
            f"--rounds {args.rounds}", f"--device {args.device}"]
    if args.threads:
        echo.append(f"--threads {args.threads}")
    return echo


if __name__ == "__main__":
    main()
