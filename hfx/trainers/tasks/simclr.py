"""``simclr``: SimCLR (Chen et al. 2020), contrastive learning of visual representations without labels.

Each image of the batch gives two random views (:func:`~hfx.trainers.tasks._ssl.random_views`: a resized crop, a
small rotation, brightness and contrast jitter; drawn on the batch from the global torch RNG, which checkpoints
restore). Both go through the backbone f (a timm model, ``task_options.backbone``) and the projection head g
(an MLP with BatchNorm, as SimCLR's), and NT-Xent (:func:`hfx.losses.contrastive.nt_xent_loss`, ``temperature``)
makes each view pick its partner among the other 2N - 1 views of the batch. Under several processes the
negatives are the GLOBAL batch's (the projections are all-gathered with their local gradient), as SimCLR's
global batch; the head's BatchNorm is per process.

Evaluation (frozen backbone features of the unaugmented train and eval splits): weighted k-NN and linear-probe
accuracy with every label and with ``few_labels`` per class, ``feature_std`` / ``collapsed`` (the collapse
monitor), and the loss on fixed views of the eval split. The artifact is the backbone alone (no head) in timm's
Hub layout: ``timm.create_model("local-dir:<final>", pretrained=True)`` gives the same features without hfx.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfx.losses.contrastive import nt_xent_loss
from hfx.trainers.config import bounded
from hfx.trainers.tasks._ssl import ContrastiveOptions, ContrastiveTask
from hfx.trainers.tasks.base import register_task


@dataclass
class SimCLROptions(ContrastiveOptions):
    """``task_options`` of ``simclr``: those of :class:`~hfx.trainers.tasks._ssl.ContrastiveOptions`."""

    temperature: float = bounded(0.5, ">0")
    """NT-Xent's temperature (SimCLR: 0.5 for small batches, 0.1 for large ones)."""


@register_task("simclr")
class SimCLRTask(ContrastiveTask):
    """SimCLR: models ``backbone`` and ``projection_head``, one optimizer, NT-Xent on two views."""

    Options = SimCLROptions
    method_name = "SimCLR"

    def build_models(self) -> dict[str, torch.nn.Module]:
        return self.build_encoder()

    def view_loss(self, models, pixels, generator=None, gather: bool = False) -> torch.Tensor:
        views = torch.cat([self.views(pixels, generator), self.views(pixels, generator)])
        z1, z2 = models["projection_head"](models["backbone"](views)).chunk(2)
        return nt_xent_loss(z1, z2, self.options.temperature, gather=gather)

    def loss(self, models, batch, state):
        return self.view_loss(models, batch["pixel_values"], gather=True)

    def method_summary(self) -> str:
        opts = self.options
        return (f"Two random views of each image (resized crops of {opts.crop_scale[0]:g}-{opts.crop_scale[1]:g} of the "
                f"area, rotations up to {opts.max_rotation:g} degrees, brightness/contrast jitter {opts.jitter:g}), a "
                f"{opts.projection_layers}-layer projection head to {opts.projection_dim} dimensions and NT-Xent with "
                f"temperature {opts.temperature:g}.")
