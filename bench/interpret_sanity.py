"""Sanity checks for saliency maps (Adebayo et al. 2018, "Sanity checks for saliency maps") and their
faithfulness (deletion / insertion, Petsiuk et al. 2018), for every hfx.interpret method on the classify-digits
models.

Models (trained here through ``hfx train`` when their ``final/`` folder is missing, one torch thread):

- ``resnet10t``: the ``classify-digits`` recipe as it ships (timm resnet10t, 16x16 digits), ``outputs/interpret-classifier``;
- ``vit``: the same recipe with a timm ViT (patch 4 on 16x16, width 64, 4 blocks, 4 heads; AdamW 1e-3, 2,000 steps),
  ``outputs/interpret-classifier-vit``.

Cascading randomisation: the layers are re-initialised (``reset_parameters()``, seed 0) from the top down, one
stage at a time (ResNet: fc, layer4, layer3, layer2, layer1, the stem; ViT: head + final norm, blocks 3 .. 0,
the patch embedding), and each method's maps for the same test images and targets (the true labels) are compared
with the trained model's by Spearman rank correlation over the pixels, per image, then averaged. A method
passes when the mean correlation after randomising the head and the top stage is below 0.5: its maps then depend
on what the model learnt rather than on the input alone (an edge detector would keep a high correlation).

Faithfulness on the trained model: pixels are removed (deletion: set to black, the digits' background) or
revealed on a black image (insertion) in the order of the map, 8 pixels per step; the area under the curve of
the true class's softmax probability (deletion: lower is better; insertion: higher). A random order is the
reference row.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/interpret_sanity.py            # trains the models if absent
    .venv/bin/python bench/interpret_sanity.py --report                       # the tables and figures again

Writes ``outputs/interpret_sanity/results.json`` and ``results.md``, and ``bench/figures/interpret_cascade.png``
(correlation per cascade stage) and ``bench/figures/interpret_maps.png`` (maps of one digit before and after).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIGURES = Path(__file__).resolve().parent / "figures"
VIT = ["task_options.model=timm:vit_tiny_patch16_224",
       "task_options.model_options={img_size: 16, patch_size: 4, embed_dim: 64, depth: 4, num_heads: 4}",
       "optimizer.lr=1e-3", "train.max_steps=2000", "eval.every_steps=500", "checkpoint.every_steps=null"]
#: model -> (run folder, recipe overrides, cascade stages from the top: module names re-initialised together).
MODELS = {
    "resnet10t": ("outputs/interpret-classifier", ["checkpoint.every_steps=null"],
                  [["fc"], ["layer4"], ["layer3"], ["layer2"], ["layer1"], ["conv1", "bn1"]]),
    "vit": ("outputs/interpret-classifier-vit", VIT,
            [["head", "norm", "fc_norm"], ["blocks.3"], ["blocks.2"], ["blocks.1"], ["blocks.0"], ["patch_embed"]]),
}
TOP_STAGES = 2  # "randomising the top layers": the head and the last stage / block
THRESHOLD = 0.5
METHODS = {
    "resnet10t": ["saliency", "smoothgrad", "guided_backprop", "deconvnet", "cam", "gradcam", "guided_gradcam"],
    "vit": ["saliency", "smoothgrad", "guided_backprop", "deconvnet", "gradcam", "guided_gradcam", "attention",
            "attention_rollout"],
}
STEP_PIXELS = 8


def ensure_model(name: str) -> Path:
    folder, overrides, _ = MODELS[name]
    final = ROOT / folder / "final"
    if not final.is_dir():
        cmd = [sys.executable, "-m", "hfx", "train", "--threads", "1", "classify-digits", f"output_dir={folder}",
               "log.report_to=[]", *overrides]
        print("training:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return final


def test_digits(n: int, preprocessing: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test digits as the classifier takes them, and their labels."""
    from hfx.data import builtin_dataset

    test = builtin_dataset("digits", image_size=preprocessing["image_size"], seed=0)["test"]
    n = min(n, len(test))
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32))[None] / 255.0 for im in test["image"][:n]])
    return (pixels - preprocessing["mean"]) / preprocessing["std"], torch.tensor(test["label"][:n])


def maps(model, pixels: torch.Tensor, labels: torch.Tensor, method: str) -> torch.Tensor:
    """(N, H, W) heatmaps; ``attention`` as the last layer's class-token map, heads averaged."""
    from hfx.interpret import explain

    heat = explain(model, pixels, method, target=labels).heatmaps
    return heat[:, -1].mean(1) if method == "attention" else heat


def randomised(model, stages: list[list[str]], seed: int = 0):
    """A copy of ``model`` with the modules of ``stages`` re-initialised (their ``reset_parameters``)."""
    torch.manual_seed(seed)
    copy_ = copy.deepcopy(model)
    names = {n for n, _ in copy_.named_modules()}
    for stage in stages:
        for name in stage:
            if name in names:
                for module in copy_.get_submodule(name).modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
                    if hasattr(module, "reset_running_stats"):
                        module.reset_running_stats()
    return copy_.eval()


def spearman(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image Spearman correlation of two (N, H, W) map stacks (NaN where a map is constant)."""
    from scipy.stats import spearmanr

    out = []
    for x, y in zip(a.flatten(1).numpy(), b.flatten(1).numpy()):
        out.append(np.nan if x.std() == 0 or y.std() == 0 else spearmanr(x, y).statistic)
    return np.asarray(out)


@torch.no_grad()
def deletion_insertion(model, pixels, labels, heat, background: float) -> tuple[float, float]:
    """Mean AUC of the true class's probability while the map's top pixels are deleted / inserted."""
    n, c, h, w = pixels.shape
    steps = list(range(0, h * w + 1, STEP_PIXELS))
    order = heat.flatten(1).argsort(dim=1, descending=True, stable=True)
    aucs = {"deletion": [], "insertion": []}
    for i in range(n):
        ranks = torch.empty(h * w, dtype=torch.long)
        ranks[order[i]] = torch.arange(h * w)
        masks = torch.stack([(ranks < k).reshape(h, w) for k in steps])[:, None]  # (S, 1, H, W): pixels taken
        image = pixels[i:i + 1]
        base = torch.full_like(image, background)
        for kind, batch in (("deletion", torch.where(masks, base, image)), ("insertion", torch.where(masks, image, base))):
            logits = model(batch)
            probs = (logits if torch.is_tensor(logits) else logits.logits).softmax(-1)[:, labels[i]]
            aucs[kind].append(float(np.trapezoid(probs.numpy(), dx=1.0 / (len(steps) - 1))))
    return float(np.mean(aucs["deletion"])), float(np.mean(aucs["insertion"]))


def run_model(name: str, n: int) -> dict:
    from hfx.metrics.classifier import TrainedImageClassifier

    classifier = TrainedImageClassifier(ensure_model(name))
    model, prep = classifier.model.eval(), classifier.preprocessing
    pixels, labels = test_digits(n, prep)
    with torch.no_grad():
        accuracy = float((model(pixels).argmax(-1) == labels).float().mean())
    background = (0.0 - prep["mean"]) / prep["std"]
    stages = MODELS[name][2]
    cascade = [randomised(model, stages[:k]) for k in range(1, len(stages) + 1)]
    rows, examples = {}, {}
    for method in METHODS[name]:
        start = time.perf_counter()
        try:
            original = maps(model, pixels, labels, method)
        except ValueError as err:
            rows[method] = {"error": str(err)}
            print(f"{name} {method}: n/a ({err})", flush=True)
            continue
        correlations = [spearman(original, maps(m, pixels, labels, method)) for m in cascade]
        deletion, insertion = deletion_insertion(model, pixels, labels, original, background)
        rows[method] = {
            "spearman": [float(np.nanmean(c)) for c in correlations],
            "spearman_sd": [float(np.nanstd(c)) for c in correlations],
            "constant_maps": [int(np.isnan(c).sum()) for c in correlations],
            "deletion_auc": deletion, "insertion_auc": insertion, "seconds": time.perf_counter() - start,
        }
        examples[method] = [original[0], maps(cascade[TOP_STAGES - 1], pixels[:1], labels[:1], method)[0],
                            maps(cascade[-1], pixels[:1], labels[:1], method)[0]]
        print(f"{name} {method}: spearman {[round(v, 3) for v in rows[method]['spearman']]} "
              f"deletion {deletion:.3f} insertion {insertion:.3f} ({rows[method]['seconds']:.1f} s)", flush=True)
    generator = torch.Generator().manual_seed(0)
    random_maps = torch.rand(pixels.shape[0], *pixels.shape[-2:], generator=generator)
    deletion, insertion = deletion_insertion(model, pixels, labels, random_maps, background)
    rows["random order"] = {"deletion_auc": deletion, "insertion_auc": insertion}
    return {"rows": rows, "accuracy": accuracy, "n": int(pixels.shape[0]), "stages": [" + ".join(s) for s in stages],
            "examples": {k: [v.tolist() for v in vs] for k, vs in examples.items()},
            "example_image": pixels[0, 0].tolist()}


def table(results: dict) -> str:
    lines = [f"| model (test accuracy) | method | Spearman after randomising the top {TOP_STAGES} stages (mean ± sd) | "
             f"after the full cascade | passes (< {THRESHOLD}) | deletion AUC (lower is better) | insertion AUC (higher is better) |",
             "|---|---|---|---|---|---|---|"]
    for name, result in results["models"].items():
        label = f"{name} ({100 * result['accuracy']:.1f} %)"
        for method, row in result["rows"].items():
            if "error" in row:
                lines.append(f"| {label} | {method} | n/a: {row['error'].split(';')[0]} | | | | |")
                continue
            if "spearman" not in row:
                lines.append(f"| {label} | {method} | | | | {row['deletion_auc']:.3f} | {row['insertion_auc']:.3f} |")
                continue
            top, sd = row["spearman"][TOP_STAGES - 1], row["spearman_sd"][TOP_STAGES - 1]
            passes = "**yes**" if top < THRESHOLD else "no"
            lines.append(f"| {label} | {method} | {top:.3f} ± {sd:.3f} | {row['spearman'][-1]:.3f} | {passes} | "
                         f"{row['deletion_auc']:.3f} | {row['insertion_auc']:.3f} |")
    return "\n".join(lines)


def figures(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(exist_ok=True)
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.6), squeeze=False)
    for ax, (name, result) in zip(axes[0], models.items()):
        for method, row in result["rows"].items():
            if "spearman" in row:
                ax.plot(range(1, len(row["spearman"]) + 1), row["spearman"], marker="o", label=method)
        ax.axhline(THRESHOLD, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(1, len(result["stages"]) + 1), [f"+{s.split(' + ')[0]}" for s in result["stages"]],
                      rotation=30, fontsize=7)
        ax.set(title=f"{name}: cascading randomisation", ylabel="Spearman vs trained maps", ylim=(-0.6, 1.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIGURES / "interpret_cascade.png", dpi=110)
    plt.close(fig)

    rows = max(len(r["examples"]) for r in models.values())
    fig, axes = plt.subplots(rows, 4 * len(models), figsize=(2.0 * 4 * len(models), 1.9 * rows), squeeze=False)
    for col0, (name, result) in zip(range(0, 4 * len(models), 4), models.items()):
        for r in range(rows):
            for c in range(4):
                axes[r][col0 + c].axis("off")
        for r, (method, triple) in enumerate(result["examples"].items()):
            axes[r][col0].imshow(result["example_image"], cmap="gray")
            axes[r][col0].set_title(f"{name}: {method}", fontsize=7)
            for c, (heat, title) in enumerate(zip(triple, ("trained", f"top {TOP_STAGES} random", "all random")), 1):
                axes[r][col0 + c].imshow(heat, cmap="jet", vmin=0, vmax=1)
                axes[r][col0 + c].set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(FIGURES / "interpret_maps.png", dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=120, help="test digits (default 120 of 360)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default="outputs/interpret_sanity")
    parser.add_argument("--report", action="store_true", help="print the tables of an earlier run")
    args = parser.parse_args()
    out = ROOT / args.out
    if args.report:
        results = json.loads((out / "results.json").read_text())
        figures(results)
        print(table(results))
        return
    torch.set_num_threads(1)
    start, load = time.time(), os.getloadavg()[0]
    results = {"models": {name: run_model(name, args.n) for name in args.models},
               "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, 1 torch thread",
               "load_start": load, "load_end": os.getloadavg()[0], "seconds": time.time() - start,
               "date": time.strftime("%Y-%m-%d"), "command": " ".join(["bench/interpret_sanity.py", *sys.argv[1:]])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results) + "\n")
    figures(results)
    print(table(results))
    print(f"{results['seconds']:.0f} s; load {load:.2f} -> {results['load_end']:.2f}")


if __name__ == "__main__":
    main()
