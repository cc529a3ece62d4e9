"""DeiT distillation on digits: does a small ViT learn more from a ResNet teacher than from the labels alone?

Rows, each a recipe trained through ``hfx train`` in a subprocess (1 torch thread) for seeds 0 and 1:

- teacher: ``classify-digits`` (timm ResNet-10-T), trained once (seed 0) or reused from
  ``outputs/classify-digits/final`` when it exists;
- ViT, no distillation: ``vit-digits`` (DeiT-tiny-shaped ViT without a distillation token);
- DeiT soft: ``deit-digits`` with ``task_options.distillation=soft`` (T^2 x KL, alpha and T of the recipe);
- DeiT hard: ``deit-digits`` as shipped (CE with the teacher's argmax, DeiT's choice).

Test accuracy is the final step's (``results.json``; no checkpoint picked on the test split), wall time is the
subprocess's. The students use the same steps, batch, optimiser and augmentation; the DeiT rows add the
distillation token and the teacher's forward. Accuracy does not depend on the machine's load; wall times do.

    OMP_NUM_THREADS=1 nice .venv/bin/python bench/deit_distillation.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench-deit"
TEACHER = ROOT / "outputs" / "classify-digits"
SEEDS = (0, 1)
STUDENTS = {  # row name -> (recipe, extra overrides)
    "ViT, no distillation": ("vit-digits", []),
    "DeiT soft": ("deit-digits", ["task_options.distillation=soft"]),
    "DeiT hard": ("deit-digits", []),
}


def hfx_train(recipe: str, output_dir: Path, overrides: list[str]) -> tuple[float, float]:
    """Train ``recipe`` into ``output_dir``; returns (test accuracy, wall seconds)."""
    command = [sys.executable, "-m", "hfx", "train", "--threads", "1", recipe, f"output_dir={output_dir}",
               "overwrite_output_dir=true", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((output_dir / "results.json").read_text())["eval/accuracy"], wall


def main() -> None:
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    if (TEACHER / "final" / "hfx_preprocessing.json").is_file():
        accuracy = json.loads((TEACHER / "results.json").read_text())["eval/accuracy"]
        rows["teacher (classify-digits, reused)"] = {0: (accuracy, float("nan"))}
    else:
        rows["teacher (classify-digits)"] = {0: hfx_train("classify-digits", TEACHER, ["seed=0"])}
    for name, (recipe, extra) in STUDENTS.items():
        rows[name] = {}
        for seed in SEEDS:
            slug = name.split(",")[0].lower().replace(" ", "-")
            rows[name][seed] = hfx_train(recipe, OUT / f"{slug}-seed{seed}", [f"seed={seed}", *extra])
            print(f"{name} seed {seed}: accuracy {rows[name][seed][0]:.4f}, {rows[name][seed][1]:.0f} s",
                  file=sys.stderr, flush=True)
    print(f"| model | {' | '.join(f'seed {s}' for s in SEEDS)} | mean | wall time (s, per seed) |")
    print(f"|---|{'---|' * len(SEEDS)}---|---|")
    for name, runs in rows.items():
        accs = [f"{runs[s][0]:.2%}" if s in runs else "-" for s in SEEDS]
        mean = sum(a for a, _ in runs.values()) / len(runs)
        walls = ", ".join("-" if w != w else f"{w:.0f}" for _, w in runs.values())
        print(f"| {name} | {' | '.join(accs)} | {mean:.2%} | {walls} |")


if __name__ == "__main__":
    main()
