"""The representation-learning table of issue 17: frozen features of every self-supervised method against raw
pixels, a random-init encoder and a supervised encoder, by k-NN (DINO's eval_knn, k 20, T 0.07) and a linear probe,
with 10 labels per class and with all labels, on the digits test split (360 images), for 2 seeds.

Each method is trained with its shipped recipe (``hfx train <method>-digits seed=<s>``, one thread); the saved
backbone is loaded as a user would, without hfx (timm ``local-dir:`` or transformers ``AutoModel``), and embeds the
unaugmented images. Finished runs are reused (delete the folder to retrain).

    OMP_NUM_THREADS=1 python bench/representation_table.py                # train what is missing, then measure
    python bench/representation_table.py --methods dino --seeds 0        # one method, one seed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench-representation"


def recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "training" / "configs" / f"{name}.yaml").read_text())


def train(name: str, out: Path, seed: int, threads: int, overrides: list[str] = ()) -> float | None:
    """Train ``name`` into ``out`` unless ``out/final`` exists; returns the wall time in minutes (None if reused)."""
    if (out / "final").is_dir():
        return None
    start = time.perf_counter()
    command = [sys.executable, "-m", "hfx", "train", "--threads", str(threads), name, f"seed={seed}",
               f"output_dir={out}", "log.report_to=[]", *overrides]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return (time.perf_counter() - start) / 60


def digits_pixels(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits split at 16x16 as the recipes read it: (pixels / 255 - 0.5) / 0.5, (N, 1, 16, 16)."""
    import hfx.data

    data = hfx.data.load("digits", image_size=16)[split]
    pixels = np.stack([np.asarray(im, dtype=np.float32) for im in data["image"]]) / 255.0
    return torch.from_numpy((pixels - 0.5) / 0.5)[:, None], torch.tensor(data["label"])


def encoder_of(folder: Path):
    """pixels -> features of a saved backbone, loaded without hfx: a timm folder (``architecture`` in config.json) or
    a transformers one (mean of the last hidden states over the patch tokens)."""
    config = json.loads((folder / "config.json").read_text())
    if "architecture" in config:
        import timm

        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        return lambda x: model(x)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    if hasattr(model.config, "mask_ratio"):
        model.config.mask_ratio = 0.0

    def encode(x):
        hidden = model(pixel_values=x).last_hidden_state
        return hidden[:, 1:].mean(1)

    return encode


@torch.no_grad()
def features(encode, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([encode(pixels[i:i + batch]).float().flatten(1) for i in range(0, len(pixels), batch)])


def scores(train_x, train_y, test_x, test_y, seed: int) -> dict[str, float]:
    from hfx.metrics.representation import feature_std, knn_accuracy, labels_per_class, linear_probe_accuracy

    few = torch.as_tensor(labels_per_class(train_y, 10, seed=seed))
    return {"knn_10": knn_accuracy(train_x[few], train_y[few], test_x, test_y),
            "probe_10": linear_probe_accuracy(train_x[few], train_y[few], test_x, test_y),
            "knn_all": knn_accuracy(train_x, train_y, test_x, test_y),
            "probe_all": linear_probe_accuracy(train_x, train_y, test_x, test_y),
            "feature_std": feature_std(test_x)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["simclr", "moco", "dino", "dino-vit", "mae"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_px, train_y = digits_pixels("train")
    test_px, test_y = digits_pixels("test")
    rows: dict[str, list[dict]] = {}
    minutes: dict[str, list[float]] = {}
    import timm

    def add(name: str, encode, seed: int) -> None:
        rows.setdefault(name, []).append(
            scores(features(encode, train_px), train_y, features(encode, test_px), test_y, seed))

    for seed in args.seeds:
        rows.setdefault("raw pixels", []).append(scores(train_px.flatten(1), train_y, test_px.flatten(1), test_y, seed))
        backbones = {}  # the random-init encoder of each method's backbone (same architecture, seed `seed`)
        for method in args.methods:
            options = recipe(f"{method}-digits").get("task_options", {})
            if "backbone" in options:
                backbones[options["backbone"]] = options.get("backbone_options", {})
        for backbone, backbone_options in backbones.items():
            torch.manual_seed(seed)
            extra = {"img_size": 16} if "vit" in backbone else {}
            model = timm.create_model(backbone[len("timm:"):], in_chans=1, num_classes=0,
                                      **{**extra, **backbone_options}).eval()
            add(f"random-init {backbone[len('timm:'):]}", model, seed)
        if "mae" in args.methods:  # MAE's encoder (a transformers ViT) at random init, unmasked, mean of the patches
            from transformers import ViTMAEConfig, ViTMAEModel

            torch.manual_seed(seed)
            config = ViTMAEConfig(image_size=16, num_channels=1, mask_ratio=0.0,
                                  **recipe("mae-digits")["task_options"].get("model", {}))
            mae = ViTMAEModel(config).eval()
            add("random-init MAE encoder", lambda x, m=mae: m(pixel_values=x).last_hidden_state[:, 1:].mean(1), seed)
        # supervised encoders, trained with every label: the ResNet-10-T of classify-digits (the same network as
        # the simclr / moco backbones) and, for the ViT methods, the ViT of vit-digits; their features before the head
        for name, label in (("classify-digits", "supervised ResNet-10-T (classify-digits, all labels)"),
                            *((("vit-digits", "supervised ViT (vit-digits, all labels)"),)
                              if any("vit" in b for b in backbones) else ())):
            out = OUT / f"{name}-s{seed}"
            wall = train(name, out, seed, args.threads, ["task_options.gradcam_grid=0"])
            if wall is not None:
                minutes.setdefault(name, []).append(wall)
            model = timm.create_model(f"local-dir:{out / 'final'}", pretrained=True).eval()
            model.reset_classifier(0)
            add(label, model, seed)
        for method in args.methods:
            out = OUT / f"{method}-s{seed}"
            wall = train(f"{method}-digits", out, seed, args.threads)
            if wall is not None:
                minutes.setdefault(method, []).append(wall)
            add(method, encoder_of(out / "final"), seed)
    print(f"\nDigits test split ({len(test_y)} images), seeds {args.seeds}; per seed / mean. k-NN: k 20, T 0.07; "
          "probe: logistic regression on standardised features.\n")
    print("| features | k-NN, 10 labels/class | probe, 10 labels/class | k-NN, all labels | probe, all labels | "
          "feature std |")
    print("|---|---|---|---|---|---|")
    for name, per_seed in rows.items():
        cells = []
        for key in ("knn_10", "probe_10", "knn_all", "probe_all", "feature_std"):
            values = [r[key] for r in per_seed]
            scale, digits = (100, 1) if key != "feature_std" else (1, 2)
            cells.append(" / ".join(f"{v * scale:.{digits}f}" for v in values)
                         + (f" (**{statistics.mean(values) * scale:.{digits}f}**)" if len(values) > 1 else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    if minutes:
        print("\nTraining wall time (min, this run): " + ", ".join(
            f"{k} {' / '.join(f'{m:.1f}' for m in v)}" for k, v in minutes.items()))
    (OUT / "table.json").write_text(json.dumps({"rows": rows, "minutes": minutes}, indent=2))


if __name__ == "__main__":
    main()
