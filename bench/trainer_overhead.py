"""Step time of hfx's training engine versus a bare PyTorch + Accelerate loop doing the same work.

Both sides train the same model on the same batches of the embedded digits (two workloads: the
classify-digits recipe's timm ResNet-10-T, and a tiny ViT whose few-ms step exposes fixed costs), with the same AdamW parameter groups, warm-up + cosine schedule, gradient clipping
and a loss read-back every 10 steps (the bare loop; the engine reads the loss every step for its NaN
guard and writes metrics.jsonl every 10 steps). Neither evaluates nor checkpoints; TensorBoard is off on
both sides. Rounds alternate (engine, bare, bare, engine, ...); each round pair gives the ratio of its two
median step times, and the figure is the median of those pair ratios, all taken in ONE run: on a shared
machine the load drifts between rounds, and a pair sees nearly the same load on both sides.

    .venv/bin/python bench/trainer_overhead.py             # prints and writes bench/RESULTS.md
    .venv/bin/python bench/trainer_overhead.py --rounds 6 --steps 60 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Training engine overhead (bench/trainer_overhead.py)"


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# name -> (description, recipe overrides). The tiny model makes the engine's fixed cost per step visible.
WORKLOADS = {
    "digits-resnet": ("classify-digits model (timm ResNet-10-T, 1.2 M parameters), 16x16 digits", []),
    "tiny-vit": ("a 1-block ViT (width 32, 26 k parameters) on 8x8 digits: a step of a few ms, so fixed costs show",
                 ["data.options={image_size: 8}", "task_options.model=timm:vit_tiny_patch16_224", "task_options.random_shift=0",
                  "task_options.model_options={img_size: 8, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}"]),
}


def engine_round(steps: int, workdir: Path, batch_size: int, overrides: list[str],
                 recipe: str = "classify-digits") -> list[float]:
    """Step times (s) of the engine on ``recipe``: the time between consecutive on_step_end calls."""
    from hfx.trainers import Callback, Trainer, load_config

    class Clock(Callback):
        def __init__(self):
            self.stamps = []

        def on_step_end(self, state, control):
            self.stamps.append(time.perf_counter())

    reset_accelerate()
    config = load_config(recipe, [
        f"output_dir={workdir}", "overwrite_output_dir=true", f"train.max_steps={steps}",
        f"train.batch_size={batch_size}", "eval.every_steps=null", "eval.at_end=false",
        "checkpoint.every_steps=null", "log.report_to=[]", "log.every_steps=10", *overrides])
    clock = Clock()
    trainer = Trainer(config, [clock])
    trainer.fit()
    return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]


def bare_round(steps: int, workdir: Path, batch_size: int, overrides: list[str]) -> list[float]:
    """Step times (s) of the loop everyone writes by hand (diffusers' examples, nanoGPT): the same model,
    data, optimizer groups, schedule and clipping."""
    from accelerate import Accelerator

    from hfx.trainers import RunState, load_config
    from hfx.trainers.engine import build_optimizer
    from hfx.trainers.schedules import build_schedule
    from hfx.trainers.tasks import get_task

    reset_accelerate()
    config = load_config("classify-digits", [f"output_dir={workdir}", "overwrite_output_dir=true",
                                             f"train.batch_size={batch_size}", *overrides])
    accelerator = Accelerator()
    torch.manual_seed(config.seed)
    task = get_task(config.task)(config, accelerator)
    data = task.build_data()
    model = task.build_models()["model"]
    optimizer = build_optimizer([model], config.optimizer)
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch_size, shuffle=True, drop_last=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    schedule = build_schedule(config, optimizer.optimizer, steps)
    state = RunState(accelerator=accelerator, config=config)
    model.train()
    stamps, step = [], 0
    while step < steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = task.loss({"model": model}, batch, state)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:
                loss.item()
            stamps.append(time.perf_counter())
            if step >= steps:
                break
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per side, alternating (default 5)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per round (default 60)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each round not timed (default 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a busy machine)")
    parser.add_argument("--workloads", default="digits-resnet,tiny-vit", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)

    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows, details = [], []
    for name in args.workloads.split(","):
        description, overrides = WORKLOADS[name]
        ratio, pair_ratios, pooled, engine, bare, n = measure(args, overrides, name)
        rows.append(f"| {name} | {engine * 1e3:.2f} ms | {bare * 1e3:.2f} ms | {(engine - bare) * 1e3:+.2f} ms | "
                    f"**{ratio:.3f}** | {pooled:.3f} |")
        details.append(f"- `{name}`: {description}; {n} timed steps per side; round-pair ratios "
                       f"{', '.join(f'{r:.3f}' for r in pair_ratios)}.")
    machine = f"{torch.get_num_threads()}-thread torch on a {platform.machine()} CPU ({_cores()} cores), no GPU"
    command = f"`.venv/bin/python bench/trainer_overhead.py --rounds {args.rounds} --steps {args.steps} " \
              f"--batch-size {args.batch_size} --threads {args.threads} --workloads {args.workloads}`"
    text = (
        f"{SECTION}\n\n"
        f"- Date: {datetime.date.today().isoformat()}; machine: {machine}. The machine was shared with other jobs "
        f"while it ran (1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
        f"{_cores()} cores), so rounds alternate engine / bare loop and each figure "
        f"is the median of round-pair ratios; single rounds still vary by +-20 %.\n"
        f"- Command: {command}\n"
        f"- Anchor: a bare PyTorch + Accelerate loop doing the same work: same model, batches, AdamW parameter "
        f"groups, warm-up + cosine, clipping 1.0 (accumulate, backward, clip, step, schedule); batch {args.batch_size}, "
        f"{args.rounds} rounds x {args.steps} steps per side and workload.\n"
        + "\n".join(details) + "\n\n"
        "| workload | engine median step | bare median step | difference | ratio engine / bare (median of pairs) "
        "| ratio of pooled medians |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\nTarget: <= 1.03.\n"
    )
    print(text)
    if not args.no_write:
        write_section(text)
    return 0


def measure(args, overrides: list[str], name: str, engine=None, bare=None):
    """Alternating rounds of both sides (``engine`` / ``bare``: functions like :func:`engine_round` and
    :func:`bare_round`, these by default); returns (median pair ratio, pair ratios, pooled-median ratio,
    engine median, bare median, timed steps per side)."""
    engine_run, bare_run = engine or engine_round, bare or bare_round
    times: dict[str, list[float]] = {"engine": [], "bare": []}
    pair_ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            medians = {}
            for side, run in (("engine", engine_run), ("bare", bare_run)) if r % 2 == 0 else \
                    (("bare", bare_run), ("engine", engine_run)):
                step_times = run(args.steps, Path(tmp) / side, args.batch_size, overrides)[args.warmup:]
                times[side].extend(step_times)
                medians[side] = statistics.median(step_times)
                print(f"{name} round {r + 1}/{args.rounds} {side:>6}: median step {medians[side] * 1e3:.2f} ms",
                      file=sys.stderr)
            pair_ratios.append(medians["engine"] / medians["bare"])
    engine, bare = statistics.median(times["engine"]), statistics.median(times["bare"])
    return statistics.median(pair_ratios), pair_ratios, engine / bare, engine, bare, len(times["engine"])


def _cores() -> int:
    return os.cpu_count() or 1


def write_section(text: str, section: str = SECTION) -> None:
    """Replace the benchmark's ``section`` of bench/RESULTS.md (up to the next ``## `` heading)."""
    content = RESULTS.read_text()
    pattern = re.compile(re.escape(section) + r".*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if not pattern.search(content):
        content = content.rstrip() + "\n\n" + text
    else:
        content = pattern.sub(lambda _: text + "\n", content, count=1)
    RESULTS.write_text(content)


if __name__ == "__main__":
    raise SystemExit(main())
