"""``image-classification``: a timm model or a transformers image model on an image dataset.

Model, by ``task_options.model``:

- ``timm:<name>`` (``timm:resnet10t``): ``timm.create_model(name, in_chans=..., num_classes=...,
  **model_options)``; saved as timm's Hub layout (``config.json`` + ``model.safetensors``), reloaded with
  ``timm.create_model("local-dir:<final>", pretrained=True)``;
- a transformers ``model_type`` (``resnet``, ``convnext``, ``vit``, ...): built from
  ``AutoConfig.for_model(model_type, **model_options)`` with random weights;
- a local folder or Hub name with ``pretrained: true``: ``AutoModelForImageClassification.from_pretrained``
  with a new head for the dataset's labels. Transformers models are saved with ``save_pretrained``.

Images are scaled to [0, 1] and normalised with ``(x - mean) / std``. Augmentation runs on the batch, in
the training process, from the global RNGs (python's ``random``, numpy's and torch's: accelerate's
``save_state`` stores all three in every checkpoint), so a resumed run draws the same augmentations as an
uninterrupted one. In order:

1. ``rand_augment`` (Cubuk et al. 2020): timm's ``rand_augment_transform`` of a config string
   (``"rand-m9-mstd0.5"``: magnitude 9 with noise 0.5, 2 ops per image), applied to each training image as
   PIL (pixels back to uint8, then normalised again); it draws from python's and numpy's RNGs;
2. ``random_shift`` / ``random_flip`` (torch RNG, on the device);
3. MixUp / CutMix (Zhang et al. 2018, Yun et al. 2019): ``timm.data.Mixup`` with ``mixup_alpha``,
   ``cutmix_alpha``, ``mixup_prob``, ``mixup_switch_prob``, ``mixup_mode`` (numpy's RNG). Targets become soft
   (B, C) (``label_smoothing`` folded in) and the loss timm's ``SoftTargetCrossEntropy``.

Stochastic depth is timm's own: ``model_options: {drop_path_rate: 0.1}`` reaches ``timm.create_model``, which
gives block i of a ViT a ``DropPath`` of rate ``drop_path_rate * i / (depth - 1)`` (identity in eval).

**DeiT distillation** (Touvron et al. 2021): ``teacher`` names a trained ``image-classification`` artifact
(e.g. ``outputs/classify-digits/final``), frozen and fed the student's (augmented, mixed) batch in its own
preprocessing (size, mean/std, channels). With a student that has a distillation token
(``timm:deit_tiny_distilled_patch16_224``) the training forward gives (class logits, distillation logits) and

    loss = (1 - distill_alpha) * CE(class logits, y) + distill_alpha * KD(distillation logits, teacher)

where KD is, by ``distillation``, ``soft`` (:func:`hfx.losses.distillation.soft_target_loss`,
``distill_temperature``^2 x KL(teacher || student) at temperature T) or ``hard`` (DeiT's choice,
:func:`hfx.losses.distillation.hard_target_loss`: CE with the teacher's argmax). In eval and in the saved
model (a plain timm artifact) the prediction is the mean of the two heads, as timm's eval forward does. A
student without that token (a plain ViT, a ResNet, a transformers model) is distilled on its class head
(Hinton et al.'s KD). A distilled DeiT trained without a teacher learns both heads from the labels (timm's
averaged output).

Each evaluation also writes Grad-CAM overlays (:func:`hfx.interpret.explain`, predicted class) of the first
``gradcam_grid`` test images to ``samples/gradcam-step-<n>.png``; the model card shows the newest.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from hfx.losses.distillation import hard_target_loss, soft_target_loss
from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks._image_tasks import ImageColumns, build_image_data, write_sample_grids
from hfx.trainers.tasks.base import Task, TaskData, register_task

logger = logging.getLogger(__name__)


@dataclass
class ImageClassificationOptions(ImageColumns):
    model: str = "timm:resnet10t"
    """``timm:<name>``, a transformers model type, or (with ``pretrained``) a folder / Hub name."""
    model_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``timm.create_model`` or of the transformers config."""
    pretrained: bool = False
    weights: str | None = None
    """timm only: a local weights file to start from (offline alternative to ``pretrained``)."""
    mean: float = 0.5
    std: float = bounded(0.5, ">0")
    label_smoothing: float = bounded(0.0, "[0,1)")
    random_shift: int = bounded(0, ">=0")
    """Translate each training image by up to this many pixels in x and y (edge padding)."""
    random_flip: bool = False
    """Flip training images left-right with probability 0.5 (not for digits or text)."""
    gradcam_grid: int = bounded(8, ">=0")
    """Test images in the Grad-CAM overlay grid written at each evaluation (and shown in the card); 0: none."""
    rand_augment: str | None = None
    """timm RandAugment config (``"rand-m9-mstd0.5"``, ``"rand-m7-n3-p0.5"``; sections m, n, p, mstd, mmax, inc,
    t{weights,3a,3aw}); None: off."""
    mixup_alpha: float = bounded(0.0, ">=0", "0 turns mixup off")
    """Beta(alpha, alpha) of MixUp's mixing weight (DeiT: 0.8); 0: no MixUp."""
    cutmix_alpha: float = bounded(0.0, ">=0", "0 turns cutmix off")
    """Beta(alpha, alpha) of CutMix's box area (DeiT: 1.0); 0: no CutMix."""
    mixup_prob: float = bounded(1.0, "[0,1]")
    """Probability of mixing a batch (or element) at all."""
    mixup_switch_prob: float = bounded(0.5, "[0,1]")
    """With both alphas > 0: probability of CutMix instead of MixUp."""
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    """timm's Mixup mode: one draw per batch, per pair or per element."""
    teacher: str | None = None
    """An ``image-classification`` artifact folder (``outputs/classify-digits/final``) to distil from."""
    distillation: Literal["none", "soft", "hard"] = "none"
    """With a ``teacher``: ``soft`` (T^2 x KL to the teacher's softened distribution) or ``hard`` (CE with the
    teacher's argmax, DeiT's better choice)."""
    distill_alpha: float = bounded(0.5, "[0,1]")
    """Weight of the distillation term; 1 - alpha weighs the label term (DeiT: 0.5)."""
    distill_temperature: float = bounded(1.0, ">0")
    """T of ``soft`` distillation (DeiT: 1.0); unused by ``hard``."""

    def __post_init__(self):
        if self.teacher is not None:
            folder = Path(self.teacher)
            if not folder.is_dir():
                raise ConfigError(f"task_options.teacher {self.teacher!r} is not a folder (train it first, e.g. "
                                  "`hfx train classify-digits` for outputs/classify-digits/final)")
            if not ((folder / "hfx_preprocessing.json").is_file() and (folder / "config.json").is_file()):
                raise ConfigError(f"task_options.teacher {self.teacher!r} is not an image-classification artifact "
                                  "(no hfx_preprocessing.json / config.json)")
            if self.distillation == "none":
                raise ConfigError("task_options.teacher is set but task_options.distillation is 'none': set it to "
                                  "'soft' or 'hard', or remove the teacher")
        elif self.distillation != "none":
            raise ConfigError(f"task_options.distillation={self.distillation!r} needs task_options.teacher (an "
                              "image-classification artifact folder)")
        if self.rand_augment is not None:
            check_rand_augment(self.rand_augment)

    @property
    def mixup_enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


#: ``distillation`` -> KD term of (student logits, teacher logits, temperature).
DISTILLATION_LOSSES = {
    "soft": soft_target_loss,
    "hard": lambda student, teacher, temperature: hard_target_loss(student, teacher),
}

_RAND_AUGMENT_SECTION = re.compile(r"(m|n|mmax|inc)\d+|(p|mstd)\d+(\.\d+)?|t(weights|3a|3aw)")
MAX_RAND_AUGMENT_OPS = 16


def check_rand_augment(config_str: str) -> None:
    """Refuse a RandAugment string that timm would reject or silently misread (an unknown section, a
    probability above 1, more than 16 ops per image): a ConfigError naming ``task_options.rand_augment``."""
    sections = config_str.split("-")
    bad = next((s for s in sections[1:] if not _RAND_AUGMENT_SECTION.fullmatch(s)), None)
    problem = None
    if sections[0] != "rand":
        problem = "it must start with 'rand'"
    elif bad is not None:
        problem = f"unknown section {bad!r}"
    else:
        values = {re.match(r"[a-z]+", s).group(): s for s in sections[1:]}
        if "p" in values and float(values["p"][1:]) > 1:
            problem = "p (the probability of each op) must be <= 1"
        elif "n" in values and int(values["n"][1:]) > MAX_RAND_AUGMENT_OPS:
            problem = f"n (ops per image) must be <= {MAX_RAND_AUGMENT_OPS}"
    if problem:
        raise ConfigError(f"task_options.rand_augment {config_str!r}: {problem} (e.g. 'rand-m9-mstd0.5'; sections "
                          "m<int> magnitude, n<int> ops, p<float> probability, mstd<float>, mmax<int>, inc<0|1>, "
                          "t<weights|3a|3aw>)")


def _posterize(img, bits_to_keep, **_):
    """timm's posterize op as Pillow < 11 ran it: keeping 0 bits gives black (Pillow 11 refuses 0 bits, which
    timm's level functions give at low magnitudes and would end a run mid-way)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    return img.point(lambda _: 0) if bits_to_keep <= 0 else ImageOps.posterize(img, bits_to_keep)


def probe_rand_augment(transform, mode: str, config_str: str) -> None:
    """Make every op of timm's RandAugment ``transform`` safe and check it: each op runs once at magnitude 0
    and at its upper bound on a small ``mode`` image, so a failure is a ConfigError before training, not a
    crash at some step."""
    import copy

    from PIL import Image
    from timm.data import auto_augment

    for op in transform.ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    image = Image.fromarray((np.arange(64, dtype=np.uint8).reshape(8, 8) * 4), "L").convert(mode)
    for op in transform.ops:
        for magnitude in (0.0, float(op.magnitude_max or auto_augment._LEVEL_DENOM)):
            probe = copy.copy(op)
            probe.prob, probe.magnitude, probe.magnitude_std = 1.0, magnitude, 0
            try:
                probe(image)
            except Exception as err:  # PIL raises many kinds
                raise ConfigError(f"task_options.rand_augment {config_str!r}: op {op.name} fails at magnitude "
                                  f"{magnitude:g} ({type(err).__name__}: {err})") from None


def rand_augment_images(transform, pixels: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Apply the PIL ``transform`` to each image of ``pixels`` (B, C, H, W), normalised as ``(x - mean) / std``
    with x in [0, 1]: to uint8 PIL images (mode L or RGB), transform, back in the same normalisation, dtype
    and device."""
    from PIL import Image

    b, c, h, w = pixels.shape
    unit = (pixels.detach().float() * std + mean).clamp(0, 1)
    arrays = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = [np.asarray(transform(Image.fromarray(a[:, :, 0] if c == 1 else a))) for a in arrays]
    unit = torch.from_numpy(np.stack(out).reshape(b, h, w, c)).permute(0, 3, 1, 2).float() / 255
    return ((unit - mean) / std).to(device=pixels.device, dtype=pixels.dtype)


def deit_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, teacher_logits: torch.Tensor,
              targets: torch.Tensor, distillation: str, alpha: float, temperature: float,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeiT's objective: ``(1 - alpha) * CE(cls_logits, targets) + alpha * KD(dist_logits, teacher_logits)``.

    Args:
        cls_logits, dist_logits: (B, C) logits of the class and distillation heads (the same tensor for a
            student without a distillation token).
        teacher_logits: (B, C), treated as constants.
        targets: (B,) class indices, or (B, C) soft targets (MixUp/CutMix, smoothing already folded in).
        distillation: a key of :data:`DISTILLATION_LOSSES` (``soft`` or ``hard``).

    Returns:
        (total, label term, distillation term), scalars.
    """
    base = supervised_loss(cls_logits, targets, label_smoothing)
    kd = DISTILLATION_LOSSES[distillation](dist_logits, teacher_logits, temperature)
    return (1 - alpha) * base + alpha * kd, base, kd


def supervised_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with (B,) class indices (``label_smoothing`` applied) or with (B, C) soft targets
    (timm's ``SoftTargetCrossEntropy``: the targets carry their smoothing)."""
    if targets.ndim == 2:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()(logits.float(), targets.float())
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image of ``images`` (B, C, H, W) by its own offsets in [-max_shift, max_shift]
    (the border pixels repeat into the uncovered area). Returns the same shape."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate").permute(0, 2, 3, 1)  # B, H+2s, W+2s, C
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1), device=images.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1), device=images.device)
    rows = dy + torch.arange(h, device=images.device)  # B, H
    cols = dx + torch.arange(w, device=images.device)  # B, W
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_flip(images: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def logits_of(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of a timm model (a tensor) or a transformers model (an output with ``.logits``)."""
    out = model(pixel_values)
    return out if torch.is_tensor(out) else out.logits


def teacher_inputs(pixels: torch.Tensor, mean: float, std: float, teacher) -> torch.Tensor:
    """The student's batch (B, C, H, W), normalised ``(x - mean) / std``, in the preprocessing the teacher (a
    :class:`~hfx.metrics.classifier.TrainedImageClassifier`) was trained with: its channels (luminance for a
    greyscale teacher of RGB images, repeated grey for an RGB teacher), its size and its mean / std."""
    unit = pixels.float() * std + mean
    channels = 1 if teacher.preprocessing.get("mode") == "L" else 3
    if unit.shape[1] == 3 and channels == 1:
        unit = (unit * unit.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)  # PIL's L
    elif unit.shape[1] == 1 and channels == 3:
        unit = unit.expand(-1, 3, -1, -1)
    return teacher.normalise(unit * 2 - 1)  # normalise takes [-1, 1]


@register_task("image-classification")
class ImageClassificationTask(Task):
    Options = ImageClassificationOptions
    hub_task_type = "image-classification"

    def build_data(self) -> TaskData:
        opts = self.options
        data, info = build_image_data(self, mean=opts.mean, std=opts.std)
        self.label_names, self.mode, self.channels, self.size = info.label_names, info.mode, info.channels, info.size
        self.rand_augment = self.mixup = None
        if opts.rand_augment is not None:
            from timm.data.auto_augment import rand_augment_transform

            fill = round(255 * min(max(opts.mean, 0.0), 1.0))  # the dataset's mean grey fills uncovered pixels
            self.rand_augment = rand_augment_transform(opts.rand_augment, {
                "translate_const": int(self.size * 0.45), "img_mean": fill if self.channels == 1 else (fill,) * 3})
            probe_rand_augment(self.rand_augment, self.mode, opts.rand_augment)
        if opts.mixup_enabled:
            from timm.data import Mixup

            if self.config.train.batch_size % 2:
                raise ConfigError(f"task_options.mixup_alpha / cutmix_alpha need an even train.batch_size (each image "
                                  f"is mixed with its mirror in the batch), got {self.config.train.batch_size}")
            self.mixup = Mixup(mixup_alpha=opts.mixup_alpha, cutmix_alpha=opts.cutmix_alpha, prob=opts.mixup_prob,
                               switch_prob=opts.mixup_switch_prob, mode=opts.mixup_mode,
                               label_smoothing=opts.label_smoothing, num_classes=len(self.label_names))
        return data

    def build_models(self) -> dict[str, torch.nn.Module]:
        models = self._build_student()
        self.teacher = self._load_teacher() if self.options.teacher is not None else None
        # timm's DeiT returns (class, distillation) logits in training only when asked; unasked (no teacher)
        # it trains the mean of its two heads, which is also what it predicts in eval.
        self.distilled = self.teacher is not None and hasattr(models["model"], "set_distilled_training")
        if self.distilled:
            models["model"].set_distilled_training(True)
        return models

    def _load_teacher(self):
        """The frozen teacher (a TrainedImageClassifier) on the training device; its labels must be ours."""
        from hfx.metrics.classifier import TrainedImageClassifier

        folder = self.options.teacher
        try:
            teacher = TrainedImageClassifier(folder)
        except Exception as err:  # a half-written or foreign folder: many kinds (json, safetensors, timm)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"task_options.teacher {folder!r} cannot be loaded: {first}") from None
        labels = teacher.preprocessing.get("labels")
        if labels is not None and list(map(str, labels)) != list(map(str, self.label_names)):
            raise ConfigError(f"task_options.teacher {folder!r} was trained on labels {labels[:10]} but the dataset "
                              f"has {self.label_names[:10]}: the teacher must classify the same classes, in order")
        teacher.model.requires_grad_(False).to(self.accelerator.device)
        return teacher

    def _build_student(self) -> dict[str, torch.nn.Module]:
        opts = self.options
        n = len(self.label_names)
        if opts.model.startswith("timm:"):
            import timm

            name = opts.model[len("timm:"):]
            if not timm.is_model(name):
                import difflib

                close = difflib.get_close_matches(name, timm.list_models(), n=1)
                raise ConfigError(f"task_options.model {opts.model!r}: timm has no model {name!r}"
                                  + (f"; did you mean 'timm:{close[0]}'?" if close else ""))
            self.model_args = {"in_chans": self.channels, "num_classes": n, **opts.model_options}
            extra = {"pretrained_cfg_overlay": {"file": opts.weights}} if opts.weights else {}
            model = timm.create_model(name, pretrained=opts.pretrained or bool(opts.weights),
                                      **self.model_args, **extra)
            return {"model": model}
        import transformers

        labels = {"id2label": dict(enumerate(self.label_names)),
                  "label2id": {name: i for i, name in enumerate(self.label_names)}}
        if opts.pretrained or Path(opts.model).is_dir():
            model = transformers.AutoModelForImageClassification.from_pretrained(
                opts.model, num_labels=n, ignore_mismatched_sizes=True, **labels, **opts.model_options)
        else:
            try:
                config = transformers.AutoConfig.for_model(opts.model, num_labels=n, **labels, **opts.model_options)
            except ValueError as err:
                raise ConfigError(f"task_options.model {opts.model!r} is neither 'timm:<name>' nor a transformers "
                                 f"model type ({str(err).splitlines()[0]})") from None
            for key in ("num_channels", "in_channels"):  # the name differs between model families
                if hasattr(config, key):
                    setattr(config, key, self.channels)
            if hasattr(config, "image_size"):
                config.image_size = self.size
            model = transformers.AutoModelForImageClassification.from_config(config)
        return {"model": model}

    def _augment(self, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RandAugment, shifts, flips, then MixUp/CutMix: (pixels, targets), targets (B,) or soft (B, C)."""
        opts = self.options
        if self.rand_augment is not None:
            pixels = rand_augment_images(self.rand_augment, pixels, opts.mean, opts.std)
        pixels = random_shift(pixels, opts.random_shift)
        pixels = random_flip(pixels) if opts.random_flip else pixels
        if self.mixup is not None:
            return self.mixup(pixels.clone(), labels)  # timm mixes in place
        return pixels, labels

    def loss(self, models, batch, state):
        opts = self.options
        pixels, targets = self._augment(batch["pixel_values"], batch["labels"])
        out = models["model"](pixels)
        if self.teacher is None:
            logits = out if torch.is_tensor(out) else out.logits
            return supervised_loss(logits, targets, opts.label_smoothing)
        cls_logits, dist_logits = out if self.distilled else (out if torch.is_tensor(out) else out.logits,) * 2
        with torch.no_grad():
            teacher_logits = logits_of(self.teacher.model, teacher_inputs(pixels, opts.mean, opts.std, self.teacher))
        loss, base, kd = deit_loss(cls_logits, dist_logits, teacher_logits, targets, opts.distillation,
                                   opts.distill_alpha, opts.distill_temperature, opts.label_smoothing)
        return loss, {"loss_labels": base, "loss_distill": kd}

    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        correct, total, loss_sum, first_batch = 0, 0, 0.0, None
        for batch in loader:
            first_batch = batch if first_batch is None else first_batch
            logits = logits_of(models["model"], batch["pixel_values"]).float()
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            hits, losses = self.accelerator.gather_for_metrics(((logits.argmax(-1) == batch["labels"]), losses))
            correct += int(hits.sum())
            total += hits.numel()
            loss_sum += float(losses.sum())
        if self.accelerator.is_main_process and first_batch is not None and self.options.gradcam_grid > 0:
            self._write_gradcam_grid(self.accelerator.unwrap_model(models["model"]), first_batch, state.global_step)
        return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1)}

    def _write_gradcam_grid(self, model, batch, step: int) -> None:
        """Grad-CAM of the predicted class over the first test images, upscaled to >= 64 px, one row."""
        from diffusers.utils import make_image_grid

        from hfx.interpret import explain, overlay

        if self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):  # a forward on one process would hang
            return
        pixels = batch["pixel_values"][: self.options.gradcam_grid]
        try:
            heatmaps = explain(model, pixels, method="gradcam").heatmaps.cpu()
        except ValueError as err:  # a model explain cannot read: the run goes on without the grid
            logger.warning("no Grad-CAM grid in the card: %s", err)
            return
        images = (pixels.detach().float().cpu() * self.options.std + self.options.mean).clamp(0, 1)
        scale = max(1, -(-64 // self.size))
        tiles = [overlay(F.interpolate(image[None], scale_factor=scale, mode="nearest")[0], heat)
                 for image, heat in zip(images, heatmaps)]
        write_sample_grids(self, {"gradcam-": make_image_grid(tiles, rows=1, cols=len(tiles))}, step)

    def save(self, models, state_dicts, output_dir: Path) -> None:
        model = models["model"]
        if self.options.model.startswith("timm:"):
            from safetensors.torch import save_file
            from timm.models._hub import save_config_for_hf

            save_file({k: v.contiguous() for k, v in state_dicts["model"].items()}, output_dir / "model.safetensors")
            save_config_for_hf(model, str(output_dir / "config.json"), model_args=self.model_args,
                               model_config={"label_names": self.label_names})
        else:
            model.save_pretrained(output_dir, state_dict=state_dicts["model"])
        preprocessing = {"image_size": self.size, "mode": self.mode, "mean": self.options.mean, "std": self.options.std,
                         "scale": "pixel / 255", "labels": self.label_names}
        (output_dir / "hfx_preprocessing.json").write_text(json.dumps(preprocessing, indent=2))

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        summary = (f"`{self.options.model}` trained from {'pretrained weights' if self.options.pretrained else 'scratch'} "
                   f"to classify {self.size}x{self.size} {'greyscale' if self.channels == 1 else 'RGB'} images into "
                   f"{len(self.label_names)} classes. Inputs: pixels / 255, then (x - {self.options.mean}) / "
                   f"{self.options.std} (see hfx_preprocessing.json).")
        opts = self.options
        if opts.teacher is not None:
            distilled = getattr(self, "distilled", False)
            head = "its distillation token's head" if distilled else "its class head"
            summary += (f" Distilled ({opts.distillation}, alpha {opts.distill_alpha}"
                        + (f", T {opts.distill_temperature}" if opts.distillation == "soft" else "")
                        + f") on {head} from the classifier `{opts.teacher}`"
                        + ("; it predicts the mean of its class and distillation heads." if distilled else "."))
        tricks = [name for name, on in (("RandAugment " + str(opts.rand_augment), opts.rand_augment),
                                        (f"MixUp {opts.mixup_alpha}", opts.mixup_alpha > 0),
                                        (f"CutMix {opts.cutmix_alpha}", opts.cutmix_alpha > 0),
                                        (f"stochastic depth {opts.model_options.get('drop_path_rate')}",
                                         opts.model_options.get("drop_path_rate"))) if on]
        if tricks:
            summary += f" Training augmentation / regularisation: {', '.join(tricks)}."
        return {"summary": summary}
