"""``vae``: train :class:`~hfx.models.vae.HfxVAEModel` (VAE, conditional VAE, or autoencoder with beta 0).

The loss is ``reconstruction + beta * w(step) * KL`` (:mod:`hfx.losses.elbo`) with the KL warm-up
``w(step) = min(1, step / kl_warmup_steps)`` (Bowman et al. 2016), which keeps the posterior from collapsing onto the prior early in
training. Evaluation reports, per held-out image and in nats, the negative ELBO (the bound on -log p(x)
whatever beta is), its reconstruction and KL terms, and writes grids of reconstructions and samples to
``samples/`` (and TensorBoard). With ``evaluator`` set (a classifier saved by the ``image-classification``
task), a conditional VAE's samples for each class are classified and ``sample_accuracy`` reported.

The saved model carries ``scaling_factor = 1 / std`` of posterior samples of the training images (of the
means, for an autoencoder), as Rombach et al. measure it: a latent diffusion model trained on
``z * scaling_factor`` sees unit-variance inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hfx.losses import beta_elbo, kl_warmup_weight
from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks._image_tasks import ImageColumns, build_image_data, image_grid, write_sample_grids
from hfx.trainers.tasks.base import Task, TaskData, register_task, with_weights


@dataclass
class VAEOptions(ImageColumns):
    model: dict[str, Any] = field(default_factory=dict)
    """``HfxVAEConfig`` fields (image size and channels come from the data)."""
    conditional: bool = False
    """A conditional VAE: ``num_classes`` from the dataset's labels."""
    kl_warmup_steps: int = bounded(0, ">=0")
    """Linear KL warm-up over this many optimizer steps (0: none)."""
    grid_size: int = bounded(8, ">=0")
    """Validation grids: reconstructions of this many test images, and this many samples per row."""
    evaluator: str | None = None
    """A classifier folder (``image-classification`` artifact) that scores a CVAE's samples per class."""
    evaluator_samples_per_class: int = bounded(50, ">=1")
    scaling_samples: int = bounded(1024, ">=1")
    """Training images encoded to measure ``scaling_factor`` at save time."""


@register_task("vae")
class VAETask(Task):
    Options = VAEOptions
    eval_seed = 30_000

    def build_data(self) -> TaskData:
        data, self.info = build_image_data(self)
        self.train_set = data.train
        return data

    def build_models(self) -> dict[str, torch.nn.Module]:
        from hfx.models.vae import HfxVAEConfig, HfxVAEModel

        opts, info = self.options, self.info
        fields = {**opts.model, "image_size": info.size, "in_channels": info.channels}
        if opts.conditional:
            fields["num_classes"] = len(info.label_names)
        try:
            config = HfxVAEConfig(**fields)
        except Exception as err:  # strict dataclass errors wrap the field's ValueError
            raise ConfigError(f"task_options.model does not make an HfxVAEConfig: {str(err).strip().splitlines()[-1]}") from None
        self.model_config = config
        if opts.evaluator and not opts.conditional:
            raise ConfigError("task_options.evaluator scores class-conditional samples: set task_options.conditional: true")
        return {"vae": HfxVAEModel(config)}

    def _labels(self, batch):
        return batch["labels"] if self.options.conditional else None

    def loss(self, models, batch, state):
        out = models["vae"](batch["pixel_values"], labels=self._labels(batch))
        loss = beta_elbo(out.reconstruction, out.kl, self.model_config.beta,
                         kl_warmup_weight(state.global_step, self.options.kl_warmup_steps))
        return loss, {"reconstruction": out.reconstruction.detach(), "kl": out.kl.detach()}

    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        vae = models["vae"]
        sums = torch.zeros(3, dtype=torch.float64)
        count = 0
        first_batch = None
        for index, batch in enumerate(loader):
            generator = self.eval_generator(batch["pixel_values"].device, index)
            out = self.accelerator.unwrap_model(vae)(batch["pixel_values"], labels=self._labels(batch),
                                                     generator=generator)
            n = torch.tensor([batch["pixel_values"].shape[0]], device=batch["pixel_values"].device)
            values = torch.stack([out.neg_elbo, out.reconstruction, out.kl]).double() * n
            values, n = self.accelerator.reduce(values, "sum"), self.accelerator.reduce(n, "sum")
            sums += values.cpu()
            count += int(n)
            if first_batch is None:
                first_batch = batch
        metrics = dict(zip(("neg_elbo", "reconstruction", "kl"), (sums / max(count, 1)).tolist()))
        model = self.accelerator.unwrap_model(vae)
        if self.options.evaluator:
            metrics["sample_accuracy"] = self.sample_accuracy(model)
        if self.accelerator.is_main_process and first_batch is not None and self.options.grid_size > 0:
            self._write_grids(model, first_batch, state.global_step)
        return metrics

    def sample_accuracy(self, model) -> float:
        """Share of a CVAE's samples asked for class c that the evaluator classifies as c."""
        from hfx.metrics.classifier import ClassSampleScorer

        if not hasattr(self, "_scorer"):
            self._scorer = ClassSampleScorer(self.options.evaluator, len(self.info.label_names),
                                             self.options.evaluator_samples_per_class)
        return self._scorer(lambda labels: model.sample(len(labels), labels=labels,
                                                        generator=torch.Generator(model.device).manual_seed(0)),
                            model.device)

    def _write_grids(self, model, batch, step: int) -> None:
        k = min(self.options.grid_size, batch["pixel_values"].shape[0])
        x = batch["pixel_values"][:k]
        labels = self._labels(batch)
        recon = model(x, labels=None if labels is None else labels[:k], sample_posterior=False).reconstruction_images
        num_classes = len(self.info.label_names)
        if self.options.conditional:
            sample_labels = torch.arange(num_classes, device=model.device).repeat_interleave(self.options.grid_size)
            rows = num_classes
        else:
            sample_labels, rows = None, self.options.grid_size
        samples = model.sample(rows * self.options.grid_size, labels=sample_labels,
                               generator=torch.Generator(model.device).manual_seed(0))
        grids = {"reconstructions-": image_grid(torch.cat([x, recon]), rows=2), "samples-": image_grid(samples, rows=rows)}
        write_sample_grids(self, grids, step)

    @torch.no_grad()
    def latent_scaling_factor(self, model) -> float:
        """1 / std of the latents of up to ``scaling_samples`` training images: posterior samples (what a
        latent diffusion model trains on), or the means for a deterministic autoencoder."""
        n = min(self.options.scaling_samples, len(self.train_set))
        loader = torch.utils.data.DataLoader(self.train_set.select(range(n)), batch_size=256)
        generator = torch.Generator(model.device).manual_seed(0)
        latents = []
        for batch in loader:
            labels = batch["labels"].to(model.device) if self.options.conditional else None
            dist = model.encode(batch["pixel_values"].to(model.device), labels).latent_dist
            latents.append((dist.mode() if model.deterministic else dist.sample(generator)).float())
        return float(1.0 / torch.cat(latents).std().clamp_min(1e-6))

    def save(self, models, state_dicts, output_dir: Path) -> None:
        model = with_weights(models["vae"], state_dicts["vae"])
        model.config.scaling_factor = self.latent_scaling_factor(model)
        model.save_pretrained(output_dir)

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        kind = "conditional VAE" if self.options.conditional else ("autoencoder" if self.model_config.beta == 0 else "VAE")
        return {"summary": f"A convolutional {kind} (hfx `HfxVAEModel`, model_type `hfx_vae`) on {self.info.size}x"
                           f"{self.info.size} images; `encode` gives the posterior, `decode` the image, `sample` and "
                           "`interpolate` generate. Metrics are nats per held-out image."}
