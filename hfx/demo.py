"""``hfx demo``: the project's main job, end to end, on data every machine has.

1. Train the digits classifier that serves as the evaluator (recipe ``classify-digits``).
2. Train the class-conditional diffusion model with classifier-free guidance (recipe ``ddpm-digits``).
3. Sample from the saved :class:`~hfx.pipelines.ClassConditionalPipeline` at several guidance scales and
   measure, in the evaluator's feature space: conditional accuracy (the evaluator's accuracy on images
   asked for class c), FID and KID against the held-out test split, and the real train-vs-test FID at the
   same sample size as the reference point. Guidance rescale and dynamic thresholding are measured at the
   high scales, where small models oversaturate.
4. Write ``pipeline/`` (the model, with these numbers in its card), ``samples.png`` (one row per class),
   ``guidance.png`` (accuracy and FID against the guidance scale) and ``results.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

GUIDANCE_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
# (label, guidance_rescale, dynamic_thresholding_ratio) measured at the high guidance scales.
TAMING = (("rescale 0.7", 0.7, None), ("dynamic thresholding 0.95", 0.0, 0.95))
TAMED_SCALES = (3.0, 5.0)


@dataclass
class SampleScore:
    """Scores of one sampling setting, on ``n`` generated images (balanced over the classes)."""

    guidance_scale: float
    variant: str
    n: int
    conditional_accuracy: float
    fid: float
    kid: float
    kid_std: float
    seconds: float


@dataclass
class DemoResult:
    output_dir: str
    evaluator_test_accuracy: float
    default_guidance_scale: float
    reference_fid_train_vs_test: float
    reference_kid_train_vs_test: float
    n_generated: int
    n_reference: int
    extractor: dict
    scores: list[SampleScore] = field(default_factory=list)
    minutes: dict[str, float] = field(default_factory=dict)

    def score(self, guidance_scale: float, variant: str = "cfg") -> SampleScore:
        return next(s for s in self.scores if s.guidance_scale == guidance_scale and s.variant == variant)


class DemoInterrupted(RuntimeError):
    """A signal stopped the demo; ``signal`` is its number. Running the demo again continues it."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by signal {signum} {where}")
        self.signal = signum


def _train(recipe: str, overrides: list[str]):
    """One engine run in this process, continued from its newest checkpoint when an earlier demo with the same
    settings was interrupted, left as it is when it finished, started over when the settings changed. The
    accelerate state is a process-wide singleton: reset it so each run gets its own configuration.

    Raises:
        DemoInterrupted: a signal stopped the run (after a checkpoint).
    """
    import yaml
    from accelerate.state import AcceleratorState, GradientState

    from hfx.hub import HubCallback
    from hfx.trainers import load_config, train
    from hfx.trainers.config import config_changes, to_dict

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    config = load_config(recipe, [*overrides, "resume_from_checkpoint=latest", "overwrite_output_dir=true"])
    saved = Path(config.output_dir) / "config.yaml"
    if saved.is_file() and config_changes(yaml.safe_load(saved.read_text()) or {}, to_dict(config)):
        logger.info("%s: the settings changed since the last demo, training %s again", config.output_dir, recipe)
        config = load_config(recipe, [*overrides, "overwrite_output_dir=true"])
    result = train(config, callbacks=[HubCallback()])
    if result.stop_reason == "signal":
        raise DemoInterrupted(result.signal, f"at step {result.global_step} of {recipe} (checkpoint saved)")
    return result


def _evaluator_extractor(folder: Path):
    """The trained classifier as a feature extractor: its penultimate features and its logits."""
    from hfx.metrics.classifier import TrainedImageClassifier
    from hfx.metrics.extractors import ModuleFeatureExtractor, file_fingerprint

    classifier = TrainedImageClassifier(folder)
    prep = classifier.preprocessing
    # mean = std = 0.5 hands the classifier [-1, 1] pixels, which it normalises its own way.
    return ModuleFeatureExtractor(
        classifier.model, name=f"hfx digits evaluator ({folder})", weights=file_fingerprint(folder / "model.safetensors"),
        image_size=prep["image_size"], channels=1 if prep["mode"] == "L" else 3, mean=(0.5,), std=(0.5,),
        feature_fn=lambda _, pixels: classifier.features_and_logits(pixels),
    )


def _balanced_labels(num_classes: int, per_class: int) -> list[int]:
    return [c for c in range(num_classes) for _ in range(per_class)]


def run_demo(output_dir: str | Path = "outputs/demo", *, per_class: int = 30, num_inference_steps: int = 25,
             guidance_scales: tuple[float, ...] = GUIDANCE_SCALES, diffusion_overrides: list[str] = (),
             evaluator_overrides: list[str] = (), seed: int = 0, batch_size: int = 250) -> DemoResult:
    """Run the whole demo into ``output_dir`` and return its measurements (also in ``results.json``).

    Args:
        per_class: generated images per class and setting (N = per_class x classes); the reference FID
            uses N training images too, so both numbers are at the same sample size.
        num_inference_steps: DDIM steps for every sample.
        diffusion_overrides, evaluator_overrides: ``key=value`` overrides of the two recipes.
    """
    from hfx.data import builtin_dataset
    from hfx.metrics.functional import frechet_distance, kernel_inception_distance
    from hfx.metrics.scoring import extract_features
    from hfx.pipelines import ClassConditionalPipeline, class_grid

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    minutes: dict[str, float] = {}

    start = time.perf_counter()
    evaluator_run = _train("classify-digits", [f"output_dir={out / 'evaluator'}", *evaluator_overrides])
    minutes["evaluator training"] = (time.perf_counter() - start) / 60

    start = time.perf_counter()
    diffusion_run = _train("ddpm-digits", [f"output_dir={out / 'diffusion'}", *diffusion_overrides])
    minutes["diffusion training"] = (time.perf_counter() - start) / 60
    pipeline_dir = out / "pipeline"
    if pipeline_dir.exists():
        shutil.rmtree(pipeline_dir)
    shutil.copytree(diffusion_run.final_dir, pipeline_dir)

    start = time.perf_counter()
    extractor = _evaluator_extractor(Path(evaluator_run.final_dir))
    digits = builtin_dataset("digits", image_size=extractor.image_size[0], seed=0)
    test = extract_features(extractor, list(digits["test"]["image"]), description="test features")
    num_classes = digits["test"].features["label"].num_classes
    n = per_class * num_classes
    rng = np.random.default_rng(seed)
    train_images = list(digits["train"]["image"])
    picks = rng.choice(len(train_images), size=min(n, len(train_images)), replace=False)
    train_subset = extract_features(extractor, [train_images[i] for i in picks], description="train features")
    kid_size = min(len(train_subset), len(test), 1000)
    reference_kid = kernel_inception_distance(train_subset.features, test.features, subset_size=kid_size)

    pipe = ClassConditionalPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    default_scale = float(pipe.config.default_guidance_scale)
    labels = _balanced_labels(num_classes, per_class)
    settings = [(g, "cfg", 0.0, None) for g in sorted(set(guidance_scales) | {default_scale})]
    settings += [(g, name, rescale, ratio) for g in TAMED_SCALES for name, rescale, ratio in TAMING]
    scores = []
    for guidance, variant, rescale, ratio in settings:
        tick = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        images = []
        for first in range(0, len(labels), batch_size):
            images += pipe(labels[first:first + batch_size], guidance_scale=guidance, guidance_rescale=rescale,
                           dynamic_thresholding_ratio=ratio, num_inference_steps=num_inference_steps,
                           generator=generator, output_type="pil").images
        generated = extract_features(extractor, images, description=f"guidance {guidance} {variant}")
        accuracy = float((generated.logits.argmax(1) == np.array(labels)).mean())
        kid = kernel_inception_distance(generated.features, test.features, subset_size=kid_size)
        scores.append(SampleScore(guidance, variant, len(images), accuracy,
                                  frechet_distance(generated.features, test.features), kid.mean, kid.std,
                                  time.perf_counter() - tick))
        logger.info("guidance %.1f %s: accuracy %.3f, FID %.2f", guidance, variant, accuracy, scores[-1].fid)
    minutes["sampling and scoring"] = (time.perf_counter() - start) / 60

    result = DemoResult(
        output_dir=str(out), evaluator_test_accuracy=float(evaluator_run.metrics.get("accuracy", float("nan"))),
        default_guidance_scale=default_scale,
        reference_fid_train_vs_test=frechet_distance(train_subset.features, test.features),
        reference_kid_train_vs_test=reference_kid.mean, n_generated=n, n_reference=len(test),
        extractor=extractor.describe(), scores=scores, minutes=minutes,
    )
    grid = class_grid(pipe, list(range(num_classes)), 10, guidance_scale=default_scale,
                      num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed))
    grid.save(out / "samples.png")
    _plot(result, out / "guidance.png")
    (out / "results.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    _add_results_to_card(result, pipeline_dir / "README.md", num_inference_steps)
    return result


def _plot(result: DemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    variants = sorted({s.variant for s in result.scores}, key=lambda v: v != "cfg")
    for variant in variants:
        points = sorted((s for s in result.scores if s.variant == variant), key=lambda s: s.guidance_scale)
        style = "o-" if variant == "cfg" else "s--"
        left.plot([s.guidance_scale for s in points], [100 * s.conditional_accuracy for s in points], style, label=variant)
        right.plot([s.guidance_scale for s in points], [s.fid for s in points], style, label=variant)
    right.axhline(result.reference_fid_train_vs_test, color="grey", linestyle=":", label="real train vs test")
    left.set(xlabel="guidance scale", ylabel="conditional accuracy (%)", ylim=(0, 102),
             title="evaluator accuracy on asked class")
    right.set(xlabel="guidance scale", ylabel="FID (evaluator features)", title=f"FID, N={result.n_generated}")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_table(result: DemoResult) -> str:
    """The demo's measurements as a Markdown table."""
    rows = ["| guidance | variant | conditional accuracy | FID | KID (x1e3) |", "|---|---|---|---|---|"]
    for s in sorted(result.scores, key=lambda s: (s.variant != "cfg", s.variant, s.guidance_scale)):
        rows.append(f"| {s.guidance_scale:g} | {s.variant} | {100 * s.conditional_accuracy:.1f} % | {s.fid:.2f} | "
                    f"{1e3 * s.kid:.2f} ± {1e3 * s.kid_std:.2f} |")
    rows.append(f"| real train vs test | - | - | {result.reference_fid_train_vs_test:.2f} | "
                f"{1e3 * result.reference_kid_train_vs_test:.2f} |")
    return "\n".join(rows)


def _add_results_to_card(result: DemoResult, card_path: Path, steps: int) -> None:
    from huggingface_hub import EvalResult, ModelCard

    card = ModelCard.load(card_path)
    default = result.score(result.default_guidance_scale)
    dataset = dict(task_type="unconditional-image-generation", dataset_type="digits", dataset_name="sklearn digits",
                   dataset_split="test")
    card.data.eval_results = [
        EvalResult(metric_type="accuracy", metric_name=f"conditional accuracy (guidance {default.guidance_scale:g})",
                   metric_value=round(default.conditional_accuracy, 4), **dataset),
        EvalResult(metric_type="fid", metric_name=f"FID (evaluator features, N={default.n})",
                   metric_value=round(default.fid, 4), **dataset),
    ]
    section = (
        f"\n## Measured by `hfx demo`\n\nN = {result.n_generated} generated images per setting (balanced over the "
        f"classes), DDIM {steps} steps, against the {result.n_reference} held-out test images. Features and "
        f"accuracy come from a separately trained digits classifier (test accuracy "
        f"{100 * result.evaluator_test_accuracy:.1f} %), so the FID values are in its feature space, not "
        f"Inception's; the real train-vs-test FID at the same N is the reference point.\n\n{results_table(result)}\n"
    )
    card.text = card.text.rstrip() + "\n" + section
    card.save(card_path)
