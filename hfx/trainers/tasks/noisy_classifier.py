"""``noisy-classifier``: the noise-aware classifier ``p(y | x_t, t)`` that classifier guidance uses.

It trains :class:`~hfx.models.noisy_classifier.NoisyClassifier` on ``x_t`` at uniformly drawn timesteps of
the noise schedule of the diffusion model it will guide (read from ``diffusion_pipeline`` when given), and
reports accuracy overall and on the noisiest and cleanest thirds of the timesteps, at noise fixed per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hfx.losses import noised
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks._image_tasks import (
    ImageColumns,
    NoiseScheduleOptions,
    build_image_data,
    noise_scheduler,
)
from hfx.trainers.tasks.base import Task, TaskData, register_task, with_weights


@dataclass
class NoisyClassifierOptions(NoiseScheduleOptions, ImageColumns):
    classifier: dict[str, Any] = field(default_factory=dict)
    """``NoisyClassifier`` keyword arguments (sizes, channels and classes are set from the data)."""
    diffusion_pipeline: str | None = None
    """A saved ClassConditionalPipeline whose noise schedule the classifier must match (its scheduler
    config replaces the options above)."""


@register_task("noisy-classifier")
class NoisyClassifierTask(Task):
    Options = NoisyClassifierOptions
    hub_task_type = "image-classification"
    eval_seed = 20_000

    def build_data(self) -> TaskData:
        data, self.info = build_image_data(self)
        return data

    def build_models(self) -> dict[str, torch.nn.Module]:
        from hfx.models.noisy_classifier import NoisyClassifier

        info = self.info
        self.scheduler = noise_scheduler(self.options)
        config = {**self.options.classifier, "sample_size": info.size, "in_channels": info.channels,
                  "num_classes": len(info.label_names)}
        try:
            return {"classifier": NoisyClassifier(**config)}
        except (TypeError, ValueError) as err:
            raise ConfigError(f"task_options.classifier does not make a NoisyClassifier: {err}") from None

    def loss(self, models, batch, state):
        x0 = batch["pixel_values"]
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(x0.device)
        x_t, t, _ = noised(self.scheduler, x0)
        return F.cross_entropy(models["classifier"](x_t, t).logits.float(), batch["labels"])

    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        """Accuracy at fixed noise and timesteps: overall, on the cleanest third (small t) and the noisiest."""
        third = self.scheduler.config.num_train_timesteps / 3
        hits = {"accuracy": [], "accuracy_low_noise": [], "accuracy_high_noise": []}
        for index, batch in enumerate(loader):
            x0 = batch["pixel_values"]
            x_t, t, _ = noised(self.scheduler, x0, self.eval_generator(x0.device, index))
            correct = models["classifier"](x_t, t).logits.argmax(-1) == batch["labels"]
            correct, t = self.accelerator.gather_for_metrics((correct, t))
            hits["accuracy"].append(correct)
            hits["accuracy_low_noise"].append(correct[t < third])
            hits["accuracy_high_noise"].append(correct[t >= 2 * third])
        return {key: float(torch.cat(values).float().mean()) if values else 0.0 for key, values in hits.items()}

    def save(self, models, state_dicts, output_dir: Path) -> None:
        with_weights(models["classifier"], state_dicts["classifier"]).save_pretrained(output_dir)

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"summary": f"A noise-aware classifier p(y | x_t, t) over {len(self.info.label_names)} classes for "
                           "classifier guidance with hfx's ClassConditionalPipeline; trained on the noise schedule of "
                           "the diffusion model it guides."}
