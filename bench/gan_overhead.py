"""Step time of the ``gan`` task in hfx's engine versus a bare PyTorch + Accelerate GAN loop doing the same updates.

Both sides train the ``gan-digits`` recipe's DCGAN (generator and discriminator, Adam 2e-4 (0.5, 0.999) each,
non-saturating loss, batch 64 of 16x16 digits) with an EMA of the generator (decay 0.999, updated after every
batch), one discriminator and one generator step per batch (n_critic 1), the discriminator frozen during the
generator's step, and a loss read-back every 10 steps. The losses are the task's own functions, so the two sides
compute the same thing and differ only in the loop around them (the engine's phases, per-phase freezing, NaN
guard, EMA, logging). No evaluation, checkpoints or TensorBoard on either side. Rounds alternate and the figure
is the median of round-pair ratios, in one run (see bench/trainer_overhead.py). Target: <= 1.05.

    .venv/bin/python bench/gan_overhead.py              # prints and writes bench/RESULTS.md
    .venv/bin/python bench/gan_overhead.py --rounds 4 --steps 40 --no-write
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer_overhead  # noqa: E402
from trainer_overhead import measure, reset_accelerate, write_section  # noqa: E402

SECTION = "## GAN task overhead (bench/gan_overhead.py)"
COMMON = ["eval.every_steps=null", "eval.at_end=false", "checkpoint.every_steps=null", "log.report_to=[]",
          "log.every_steps=10", "task_options.grid_size=0"]


def engine_round(steps: int, workdir: Path, batch_size: int, overrides: list[str]) -> list[float]:
    """Step times (s) of the engine (one step: the discriminator's and the generator's update of a batch)."""
    return trainer_overhead.engine_round(steps, workdir, batch_size, ["task_options.grid_size=0", *overrides],
                                         recipe="gan-digits")


def bare_round(steps: int, workdir: Path, batch_size: int, overrides: list[str]) -> list[float]:
    """Step times (s) of the GAN loop written by hand (PyTorch's DCGAN example, with Accelerate and an EMA)."""
    from accelerate import Accelerator

    from hfx.trainers import RunState, load_config
    from hfx.trainers.engine import build_optimizer
    from hfx.trainers.tasks import get_task

    reset_accelerate()
    config = load_config("gan-digits", [f"output_dir={workdir}", "overwrite_output_dir=true",
                                        f"train.batch_size={batch_size}", *COMMON, *overrides])
    accelerator = Accelerator()
    torch.manual_seed(config.seed)
    task = get_task(config.task)(config, accelerator)
    data = task.build_data()
    models = task.build_models()
    G, D = models["generator"], models["discriminator"]
    opt_g, opt_d = build_optimizer([G], config.optimizer), build_optimizer([D], config.optimizer)
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch_size, shuffle=True, drop_last=True,
                                         collate_fn=data.collate_fn)
    G, D, opt_g, opt_d, loader = accelerator.prepare(G, D, opt_g, opt_d, loader)
    ema = copy.deepcopy(accelerator.unwrap_model(G)).requires_grad_(False)
    ema_params, g_params = list(ema.parameters()), list(accelerator.unwrap_model(G).parameters())
    decay = config.ema.decay
    state = RunState(accelerator=accelerator, config=config)
    models = {"generator": G, "discriminator": D}
    G.train()
    D.train()
    stamps, step = [], 0
    while step < steps:
        for batch in loader:
            state.phase = "discriminator"  # the discriminator's step: fakes without a graph through G
            d_loss, _ = task.loss(models, batch, state)
            accelerator.backward(d_loss)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            state.phase = "generator"  # the generator's step through a frozen D
            D.requires_grad_(False)
            g_loss = task.loss(models, batch, state)
            accelerator.backward(g_loss)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            D.requires_grad_(True)
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, g_params, 1.0 - decay)
            step += 1
            state.global_step = step
            if step % 10 == 0:
                d_loss.item()
                g_loss.item()
            stamps.append(time.perf_counter())
            if step >= steps:
                break
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per side, alternating (default 6)")
    parser.add_argument("--steps", type=int, default=60, help="batches per round (default 60)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each round not timed (default 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    for key in ("rounds", "steps", "batch_size", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if not 0 <= args.warmup < args.steps - 1:
        parser.error(f"--warmup must be in [0, --steps - 1), got {args.warmup}")

    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    ratio, pair_ratios, pooled, engine, bare, n = measure(args, [], "gan-digits", engine_round, bare_round)
    text = (
        f"{SECTION}\n\n"
        f"- Date: {datetime.date.today().isoformat()}; machine: {torch.get_num_threads()}-thread torch on a "
        f"{platform.machine()} CPU ({os.cpu_count()} cores), no GPU; 1-minute load average {load_before:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end.\n"
        f"- Command: `.venv/bin/python bench/gan_overhead.py --rounds {args.rounds} --steps {args.steps} "
        f"--batch-size {args.batch_size} --threads {args.threads}`\n"
        "- Anchor: a bare PyTorch + Accelerate GAN loop with the same models, batches, Adam optimizers, losses (the "
        "task's functions), D frozen for G's step and an EMA of G after every batch; "
        f"{args.rounds} rounds x {args.steps} batches per side, {n} timed steps per side; round-pair ratios "
        f"{', '.join(f'{r:.3f}' for r in pair_ratios)}.\n\n"
        "| workload | engine median step | bare median step | difference | ratio engine / bare (median of pairs) "
        "| ratio of pooled medians |\n|---|---|---|---|---|---|\n"
        f"| gan-digits (DCGAN, D + G step per batch) | {engine * 1e3:.2f} ms | {bare * 1e3:.2f} ms | "
        f"{(engine - bare) * 1e3:+.2f} ms | **{ratio:.3f}** | {pooled:.3f} |\n\nTarget: <= 1.05.\n"
    )
    print(text)
    if not args.no_write:
        write_section(text, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
