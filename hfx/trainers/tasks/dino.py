"""``dino``: self-distillation with no labels (Caron et al. 2021; facebookresearch/dino's ``main_dino.py``).

A student (a timm ViT or convnet + the DINO head) learns to match, on every crop, the output distribution a teacher gives
on the OTHER global crops of the same image. The teacher is the student's exponential moving average (no
gradients), its momentum rising from ``teacher_momentum`` (0.996) to ``teacher_momentum_final`` (1) on a cosine
over ``train.max_steps`` (:func:`teacher_momentum_at`; the position follows from ``state.global_step``, so a
resumed run updates exactly as an uninterrupted one). Collapse is avoided by centring the teacher's logits
with a running mean (``center_momentum`` 0.9, :func:`hfx.losses.dino_center`) and sharpening them with a low
temperature (``warmup_teacher_temperature`` -> ``teacher_temperature`` over
``warmup_teacher_temperature_steps``; the student's is ``student_temperature``, 0.1).

Multi-crop: 2 global crops (area ``global_crop_scale``, the image's side) and ``local_crops`` local crops (area
``local_crop_scale``, side ``local_crop_size``), drawn on the batch from the global RNG
(:func:`hfx.trainers.tasks._ssl.random_views`). The teacher sees only the global crops; the student sees all
of them. The ViT takes every crop size (timm's ``dynamic_img_size=True``, set by default; the position
embedding is interpolated per size); a convnet (e.g. ``timm:resnet10t``, DINO's ResNet-50 setting) takes any size
as it is, and gets no ViT options.

What a checkpoint holds: the student, its optimizer AND the teacher are models the engine prepares, so
``accelerator.save_state`` writes the teacher's weights (``model_1.safetensors``, in no optimizer group) and
restores them bit-exactly; the center is the task's state (:meth:`DinoTask.state_dict`). The center moves once per
micro-batch (with gradient accumulation: once per micro-batch, as DINO's once per forward), the teacher once per
optimizer step (:class:`TeacherUpdate`, after the step, on every process alike).

Evaluation (of the TEACHER's backbone, as DINO evaluates): the frozen-feature metrics of
:func:`~hfx.trainers.tasks._ssl.representation_metrics` (k-NN, linear probe, few labels, ``feature_std``), the
student's as ``student_*`` with ``evaluate_student``, and a figure of the [CLS] token's self-attention in the
teacher's last block, one column per head, over ``attention_grid`` test images:
``samples/attention-step-<n>.png`` (the model card shows the newest); a backbone without attention layers (a
ResNet) gets no figure, and the run says so once.

Artifact: the teacher's backbone (no head) in timm's Hub layout, loadable without hfx with
``timm.create_model("local-dir:<final>", pretrained=True)``; it returns pooled features (``num_classes=0``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hfx.losses.contrastive import dino_center, dino_loss
from hfx.trainers.callbacks import Callback
from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks._image_tasks import write_sample_grids
from hfx.trainers.tasks._ssl import (
    RepresentationOptions,
    build_backbone,
    random_views,
    representation_data,
    representation_metrics,
    save_timm_backbone,
)
from hfx.trainers.tasks.base import Task, TaskData, register_task

logger = logging.getLogger(__name__)


@dataclass
class DinoOptions(RepresentationOptions):
    """``task_options`` of ``dino`` (beside the backbone and evaluation options of :class:`RepresentationOptions`)."""

    out_dim: int = bounded(4096, ">=1")
    """K, the head's output dimension (DINO: 65536 on ImageNet; 1024-4096 for small data)."""
    head_hidden_dim: int = bounded(2048, ">=1")
    head_bottleneck_dim: int = bounded(256, ">=1")
    head_batch_norm: bool = False
    """Batch norm after the head's hidden layers (DINO's ``use_bn_in_head``; off for ViTs on ImageNet). On small data
    it keeps the head's input spread out while the backbone's features are still nearly constant."""
    teacher_momentum: float = bounded(0.996, "[0,1]")
    """The teacher's EMA momentum at step 0; it rises on a cosine to ``teacher_momentum_final`` at the end."""
    teacher_momentum_final: float = bounded(1.0, "[0,1]")
    teacher_temperature: float = bounded(0.04, ">0")
    """The teacher's softmax temperature after the warm-up (DINO: 0.04 - 0.07)."""
    warmup_teacher_temperature: float = bounded(0.04, ">0")
    warmup_teacher_temperature_steps: int = bounded(0, ">=0")
    """Steps over which the teacher's temperature goes linearly from the warm-up value to ``teacher_temperature``."""
    student_temperature: float = bounded(0.1, ">0")
    center_momentum: float = bounded(0.9, "[0,1]")
    global_crop_scale: tuple[float, float] = bounded((0.4, 1.0), "(0,1]")
    """Area fraction of the image each of the 2 global crops covers (at the image's side)."""
    local_crops: int = bounded(6, ">=0")
    """Local crops per image (seen by the student only); 0: global crops only."""
    local_crop_scale: tuple[float, float] = bounded((0.05, 0.4), "(0,1]")
    local_crop_size: int | None = bounded(None, ">=1", "null takes half the image's side")
    max_rotation: float = bounded(15.0, ">=0")
    """Degrees of random rotation in every crop (``random_views``)."""
    jitter: float = bounded(0.4, ">=0")
    """Brightness and contrast jitter of every crop (``random_views``)."""
    freeze_last_layer_steps: int = bounded(0, ">=0")
    """DINO's ``freeze_last_layer``: the head's last layer gets no gradient during the first steps."""
    evaluate_student: bool = False
    """Also report the student backbone's frozen-feature metrics (``student_*``)."""
    attention_grid: int = bounded(4, ">=0")
    """Test images in the [CLS]-attention figure of each evaluation; 0: none."""

    def __post_init__(self):
        for key in ("global_crop_scale", "local_crop_scale"):
            low, high = getattr(self, key)
            if not low <= high:
                raise ConfigError(f"config key 'task_options.{key}' must be (low, high) with low <= high, got "
                                  f"{list(getattr(self, key))!r}")


# ---------------------------------------------------------------------------------------------- schedules
def teacher_momentum_at(step: int, max_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """The teacher's EMA momentum for the update after optimizer step ``step`` (0-based) of ``max_steps``: DINO's
    ``cosine_scheduler(base, final)``, ``final + (base - final) * (1 + cos(pi * step / max_steps)) / 2``."""
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / max(max_steps, 1)))


def teacher_temperature_at(step: int, warmup: float, final: float, warmup_steps: int) -> float:
    """The teacher's temperature at step ``step``: ``np.linspace(warmup, final, warmup_steps)[step]`` during the
    warm-up (DINO's schedule), ``final`` after."""
    if step >= warmup_steps:
        return final
    if warmup_steps == 1:
        return warmup
    return warmup + (final - warmup) * step / (warmup_steps - 1)


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of ``probs`` (B, K)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


# ---------------------------------------------------------------------------------------------- models
class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer MLP (GELU; optionally batch norm after the hidden layers) down to ``bottleneck_dim``, L2-normalised, then a weight-
    normalised linear layer without bias to ``out_dim`` logits (``norm_last_layer=True``: its rows have unit
    norm, the gain is fixed at 1). Input (B, in_dim), output (B, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 batch_norm: bool = False):
        super().__init__()
        def norm() -> nn.Module:
            return nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity()

        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), norm(), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 norm(), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        #: the direction ``v`` of weight norm (the gain is 1): ``weight = v / ||v||`` row-wise
        self.last_layer = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_layer, a=math.sqrt(5))  # nn.Linear's initialisation

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-12)
        weight = F.normalize(self.last_layer, dim=1)
        return F.linear(x, weight.detach() if freeze_last_layer else weight)


class DINOModel(nn.Module):
    """Backbone + :class:`DINOHead` over a list of crops (DINO's ``MultiCropWrapper``): the crops of each side run
    through the backbone together, then the head runs once. Returns one (B, out_dim) tensor per crop, in order."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor], freeze_last_layer: bool = False) -> list[torch.Tensor]:
        features, start = [], 0
        while start < len(crops):  # consecutive crops of one side form a batch
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        logits = self.head(torch.cat(features), freeze_last_layer)
        return list(logits.chunk(len(crops)))


class TeacherUpdate(Callback):
    """After every optimizer step: ``teacher = m * teacher + (1 - m) * student``, parameter by parameter, with
    ``m = teacher_momentum_at(step - 1)`` (the step just taken, 0-based)."""

    def __init__(self, task: DinoTask):
        self.task = task

    @torch.no_grad()
    def on_step_end(self, state, control) -> None:
        student, teacher = state.models["student"], state.models["teacher"]
        m = self.task.momentum(state.global_step - 1, state.max_steps)
        for (name, p_s), (name_t, p_t) in zip(student.named_parameters(), teacher.named_parameters(), strict=True):
            assert name == name_t, (name, name_t)
            p_t.mul_(m).add_(p_s.detach().to(p_t.dtype), alpha=1 - m)


# ---------------------------------------------------------------------------------------------- the task
@register_task("dino")
class DinoTask(Task):
    """DINO self-distillation of a timm backbone, a ViT or a convnet (see the module docstring)."""

    Options = DinoOptions
    hub_task_type = "image-feature-extraction"

    def build_data(self) -> TaskData:
        data = representation_data(self)
        self.local_size = self.options.local_crop_size or max(1, self.info.size // 2)
        return data

    def _backbone_options(self) -> dict[str, Any]:
        """``backbone_options`` with, for a ViT, the image's side and ``dynamic_img_size`` by default."""
        import timm

        args = dict(self.options.backbone_options)
        name = self.options.backbone[len("timm:"):] if self.options.backbone.startswith("timm:") else ""
        if timm.is_model(name) and timm.models.is_model_in_modules(name, ["vision_transformer"]):
            args.setdefault("img_size", self.info.size)
            args.setdefault("dynamic_img_size", True)
        return args

    def build_models(self) -> dict[str, torch.nn.Module]:
        opts = self.options
        args = self._backbone_options()
        self.model_args = {"in_chans": self.info.channels, "num_classes": 0, **args}
        student_backbone = build_backbone(dataclasses.replace(opts, backbone_options=args), self.info.channels)
        if not hasattr(student_backbone, "num_features"):
            raise ConfigError(f"task_options.backbone {opts.backbone!r} has no num_features")
        if self.local_size != self.info.size and opts.local_crops and not getattr(student_backbone, "dynamic_img_size", True):
            raise ConfigError(f"task_options.backbone_options.dynamic_img_size is false, but the local crops "
                              f"({self.local_size} px) differ from the global ones ({self.info.size} px)")
        head = DINOHead(student_backbone.num_features, opts.out_dim, opts.head_hidden_dim, opts.head_bottleneck_dim,
                        opts.head_batch_norm)
        student = DINOModel(student_backbone, head)
        # The teacher starts as the student; it has no stochastic depth (DINO builds it without drop_path).
        teacher_args = {k: v for k, v in args.items() if k != "drop_path_rate"}
        teacher = DINOModel(build_backbone(dataclasses.replace(opts, backbone_options=teacher_args), self.info.channels),
                            copy.deepcopy(head))
        teacher.load_state_dict(student.state_dict())
        self.center = torch.zeros(1, opts.out_dim)
        return {"student": student, "teacher": teacher}

    def optimizer_groups(self, models):
        return {"main": ["student"]}  # the teacher is an average, trained by no optimizer

    def ema_models(self, models):
        return ["student"]

    def callbacks(self) -> list[Callback]:
        return [TeacherUpdate(self)]

    def momentum(self, step: int, max_steps: int) -> float:
        """The teacher's momentum for the update after step ``step`` (0-based)."""
        return teacher_momentum_at(step, max_steps, self.options.teacher_momentum, self.options.teacher_momentum_final)

    def crops(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(2 global crops, ``local_crops`` local crops) of ``pixels`` (B, C, S, S), each (B, C, side, side)."""
        opts = self.options
        view = dict(max_rotation=opts.max_rotation, jitter=opts.jitter, fill=(0.0 - opts.mean) / opts.std)
        global_crops = [random_views(pixels, self.info.size, opts.global_crop_scale, **view) for _ in range(2)]
        local_crops = [random_views(pixels, self.local_size, opts.local_crop_scale, **view)
                       for _ in range(opts.local_crops)]
        return global_crops, local_crops

    def loss(self, models, batch, state):
        opts = self.options
        global_crops, local_crops = self.crops(batch["pixel_values"])
        with torch.no_grad():
            teacher_logits = models["teacher"](global_crops)
        student_logits = models["student"](global_crops + local_crops,
                                           freeze_last_layer=state.global_step < opts.freeze_last_layer_steps)
        temperature = teacher_temperature_at(state.global_step, opts.warmup_teacher_temperature,
                                             opts.teacher_temperature, opts.warmup_teacher_temperature_steps)
        center = self.center = self.center.to(teacher_logits[0].device)
        loss = dino_loss(student_logits, teacher_logits, center, opts.student_temperature, temperature)
        self.center = dino_center(center, teacher_logits, opts.center_momentum)
        with torch.no_grad():
            # The loss is the teacher targets' entropy plus KL(target || student), both averaged over the crop
            # pairs: an entropy near 0 is the one-dimension collapse, near ln K the uniform one (DINO's Fig. 7).
            entropy = torch.stack([_entropy(F.softmax((t.float() - center) / temperature, dim=-1))
                                   for t in teacher_logits]).mean()
        return loss, {"teacher_temperature": temperature, "teacher_entropy": entropy, "kl_divergence": loss - entropy,
                      "teacher_momentum": self.momentum(state.global_step, state.max_steps)}

    # ------------------------------------------------------------------------------------------ task state
    def state_dict(self) -> dict[str, Any]:
        return {"center": self.center.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        center = state["center"]
        if tuple(center.shape) != (1, self.options.out_dim):
            raise ConfigError(f"the checkpoint's DINO center has {center.shape[-1]} dimensions, task_options.out_dim is "
                              f"{self.options.out_dim}: resume with the out_dim it was trained with")
        self.center = center.to(self.accelerator.device)

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        teacher = self.accelerator.unwrap_model(models["teacher"]).backbone
        metrics = representation_metrics(self, teacher, self.train_set, self.eval_set)
        if self.options.evaluate_student:
            student = self.accelerator.unwrap_model(models["student"]).backbone
            metrics.update({f"student_{k}": v for k, v in
                            representation_metrics(self, student, self.train_set, self.eval_set).items()})
        if self.accelerator.is_main_process and self.options.attention_grid > 0:
            self._write_attention_figure(teacher, state.global_step)
        return metrics

    def _no_attention_figure(self, reason: str) -> None:
        """Say once per run that no [CLS]-attention figure is drawn (a ResNet backbone, say), and why."""
        if not getattr(self, "_said_no_attention", False):
            self._said_no_attention = True
            logger.info("no attention figure: %s", reason)

    def _write_attention_figure(self, backbone: nn.Module, step: int) -> None:
        """One row per test image: the image, then the [CLS] token's attention in the last block over the patch
        grid, per head (upsampled to >= 64 px, overlaid)."""
        from diffusers.utils import make_image_grid

        from hfx.interpret import explain, overlay

        if self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):  # a forward on one process would hang
            return
        n = min(self.options.attention_grid, len(self.eval_set))
        pixels = torch.stack([self.eval_set[i]["pixel_values"] for i in range(n)]).to(self.accelerator.device)
        if not any(isinstance(m, nn.MultiheadAttention) or type(m).__name__ == "Attention" for m in backbone.modules()):
            self._no_attention_figure(f"{self.options.backbone} has no attention layers (the figure is a ViT's)")
            return
        try:
            maps = explain(backbone, pixels, method="attention").heatmaps  # (B, layers, heads, H, W)
        except ValueError as err:  # no attention maps: the run goes on without the figure
            self._no_attention_figure(str(err))
            return
        last = maps[:, -1].float().cpu()
        scale = max(1, -(-64 // self.info.size))
        images = F.interpolate((pixels.float().cpu() * self.options.std + self.options.mean).clamp(0, 1),
                               scale_factor=scale, mode="nearest")
        tiles = []
        for image, heads in zip(images, last):
            tiles.append(overlay(image, torch.zeros(image.shape[-2:]), alpha=0.0))
            tiles.extend(overlay(image, head / head.max().clamp_min(1e-12)) for head in heads)
        write_sample_grids(self, {"attention-": make_image_grid(tiles, rows=n, cols=1 + last.shape[1])}, step)

    # ------------------------------------------------------------------------------------------ artifact
    def save(self, models, state_dicts, output_dir: Path) -> None:
        prefix = "backbone."
        weights = {k[len(prefix):]: v for k, v in state_dicts["teacher"].items() if k.startswith(prefix)}
        save_timm_backbone(models["teacher"].backbone, weights, self.model_args, output_dir)
        self.save_preprocessing(output_dir)

    def save_preprocessing(self, output_dir: Path) -> None:
        preprocessing = {"image_size": self.info.size, "mode": self.info.mode, "mean": self.options.mean,
                         "std": self.options.std, "scale": "pixel / 255"}
        (output_dir / "hfx_preprocessing.json").write_text(json.dumps(preprocessing, indent=2))

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        opts = self.options
        summary = (f"`{opts.backbone}` pretrained with DINO (self-distillation, no labels) on {self.info.size}x"
                   f"{self.info.size} {'greyscale' if self.info.channels == 1 else 'RGB'} images: 2 global + "
                   f"{opts.local_crops} local crops, head K={opts.out_dim}, teacher momentum {opts.teacher_momentum:g} -> "
                   f"{opts.teacher_momentum_final:g}, teacher temperature {opts.teacher_temperature:g}. The artifact is the "
                   f"teacher's backbone (pooled features, no head); the reported accuracies are k-NN and linear probes of "
                   f"its frozen features. Inputs: pixels / 255, then (x - {opts.mean}) / {opts.std}.")
        return {"summary": summary}
