"""``moco``: MoCo v2 (He et al. 2020; Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning").

Two encoders of the same shape, each a timm backbone and an MLP projection head (no BatchNorm, as MoCo v2's):

- the **query encoder** (models ``backbone`` and ``projection_head``), trained by the optimizer;
- the **key encoder** (models ``key_backbone`` and ``key_projection_head``), a copy of it at the start that no
  optimizer trains: before the key forward of every step it moves towards the query encoder,
  ``key <- momentum * key + (1 - momentum) * query`` (``momentum``: MoCo's 0.999 for ImageNet; 0.99 here by
  default, for small datasets and short runs).

Each image gives two random views (drawn on the batch from the global torch RNG): the query view through the
query encoder, the key view through the key encoder (no gradient). InfoNCE
(:func:`hfx.losses.contrastive.info_nce_loss`, ``temperature`` 0.2) makes each query pick its own key among the
``queue_size`` keys of earlier batches; then the batch's normalised keys replace the oldest ones in the queue
(a ring buffer, so ``queue_size`` need only be at least the keys of one step). Under several processes the
queue takes the keys of the GLOBAL batch (all-gathered in process order), so every process holds the same queue.

Shuffling BN: MoCo shuffles the key batch across processes because a ResNet's BatchNorm lets a query "cheat"
through batch statistics shared with its key. A ViT (the default backbone) has LayerNorm only: nothing to
shuffle. With a BatchNorm backbone (``timm:resnet10t``) on several processes this task does NOT shuffle: each
process's BatchNorm sees its own batch; on small digits runs this has not shown the cheating, but watch
``feature_std`` and the k-NN accuracy if you scale out.

Resume: the key encoder is models of the run (saved by every checkpoint with the others, trained by no optimizer,
not averaged by ``ema``), the queue and its pointer are task state (:meth:`MoCoTask.state_dict`), so a killed run
resumes bit-exactly. The momentum update happens inside the loss, before the key forward, once per optimizer step
(the first micro-batch of an accumulation window), from the query weights of the step before: exactly MoCo's.

Evaluation, artifact and card: those of :class:`~hfx.trainers.tasks._ssl.ContrastiveTask` (frozen-feature k-NN,
linear probe, collapse monitor, the loss on fixed eval views against the current queue; the query backbone alone,
as a plain timm model).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hfx.losses.contrastive import gather_with_local_grad, info_nce_loss
from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError, ResumeError
from hfx.trainers.tasks._ssl import ContrastiveOptions, ContrastiveTask, momentum_update
from hfx.trainers.tasks.base import TaskData, register_task

logger = logging.getLogger(__name__)

#: The query models (trained) and their momentum copies (the key encoder), in the same order.
QUERY_MODELS = ("backbone", "projection_head")
KEY_MODELS = ("key_backbone", "key_projection_head")


@dataclass
class MoCoOptions(ContrastiveOptions):
    """``task_options`` of ``moco``: those of :class:`~hfx.trainers.tasks._ssl.ContrastiveOptions` and the queue and
    momentum of MoCo."""

    temperature: float = bounded(0.2, ">0")
    """InfoNCE's temperature (MoCo v2: 0.2)."""
    momentum: float = bounded(0.99, "[0,1)")
    """The key encoder's momentum m: ``key <- m * key + (1 - m) * query`` every step (MoCo: 0.999)."""
    queue_size: int = bounded(4096, ">=1")
    """K, the negatives: keys of earlier batches (MoCo: 65536). At least the keys of one step
    (``train.batch_size`` x processes); best below the number of training images."""
    projection_batch_norm: bool = False
    """MoCo v2's head has no BatchNorm."""


@register_task("moco")
class MoCoTask(ContrastiveTask):
    """MoCo v2: query models ``backbone`` + ``projection_head`` (one optimizer), key models ``key_backbone`` +
    ``key_projection_head`` (momentum copies), a queue of ``queue_size`` keys (task state)."""

    Options = MoCoOptions
    method_name = "MoCo v2"

    def build_data(self) -> TaskData:
        data = super().build_data()
        opts, train = self.options, self.config.train
        keys_per_step = train.batch_size * self.accelerator.num_processes
        if opts.queue_size < keys_per_step:
            raise ConfigError(f"task_options.queue_size {opts.queue_size} is smaller than the keys one step enqueues "
                              f"(train.batch_size {train.batch_size} x {self.accelerator.num_processes} process(es) = "
                              f"{keys_per_step}): raise it or lower the batch size")
        if opts.projection_batch_norm and train.batch_size < 2:
            raise ConfigError("task_options.projection_batch_norm needs train.batch_size >= 2 (BatchNorm over one "
                              "image per process)")
        if opts.queue_size >= len(data.train):
            logger.warning("task_options.queue_size %d is not below the %d training images: each image's own earlier "
                           "keys are among its negatives", opts.queue_size, len(data.train))
        return data

    def build_models(self) -> dict[str, torch.nn.Module]:
        models = self.build_encoder()
        for query, key in zip(QUERY_MODELS, KEY_MODELS):
            # MoCo: the key encoder starts as the query encoder and never takes a gradient. With no trainable
            # parameter it is not wrapped for DDP, and no optimizer lists it; accelerate's checkpoints save it.
            models[key] = copy.deepcopy(models[query]).requires_grad_(False)
        # MoCo's queue starts as random unit vectors: from the recipe's seed, not the global RNG.
        generator = torch.Generator().manual_seed(self.config.seed)
        queue = torch.randn(self.options.queue_size, self.options.projection_dim, generator=generator)
        self.queue = F.normalize(queue, dim=1).to(self.accelerator.device)
        self.queue_ptr = 0
        self.keys_seen = 0
        self._key_step: int | None = None  # the step whose momentum update is done
        return models

    def optimizer_groups(self, models) -> dict[str, list[str]]:
        return {"main": list(QUERY_MODELS)}

    def ema_models(self, models) -> list[str]:
        return list(QUERY_MODELS)

    # ------------------------------------------------------------------------------------------ the method
    @torch.no_grad()
    def encode_keys(self, models, pixels: torch.Tensor) -> torch.Tensor:
        """The key encoder's normalised (B, projection_dim) keys of ``pixels``, float32."""
        keys = models["key_projection_head"](models["key_backbone"](pixels))
        return F.normalize(keys.float(), dim=1)

    def view_loss(self, models, pixels, generator=None) -> torch.Tensor:
        queries = models["projection_head"](models["backbone"](self.views(pixels, generator)))
        keys = self.encode_keys(models, self.views(pixels, generator))
        return info_nce_loss(queries, keys, self.queue, self.options.temperature)

    def loss(self, models, batch, state):
        if self._key_step != state.global_step:  # once per optimizer step, before the key forward
            for query, key in zip(QUERY_MODELS, KEY_MODELS):
                momentum_update(models[key], state.models[query], self.options.momentum)
            self._key_step = state.global_step
        pixels = batch["pixel_values"]
        queries = models["projection_head"](models["backbone"](self.views(pixels)))
        keys = self.encode_keys(models, self.views(pixels))
        loss = info_nce_loss(queries, keys, self.queue, self.options.temperature)
        self.enqueue(gather_with_local_grad(keys))
        return loss

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest ``len(keys)`` keys of the queue with ``keys`` (a ring buffer)."""
        size = self.queue.shape[0]
        index = (self.queue_ptr + torch.arange(len(keys), device=self.queue.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr = (self.queue_ptr + len(keys)) % size
        self.keys_seen += len(keys)

    # ------------------------------------------------------------------------------------------ task state
    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue.detach().cpu().clone(), "queue_ptr": self.queue_ptr, "keys_seen": self.keys_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        queue = state["queue"]
        if tuple(queue.shape) != tuple(self.queue.shape):
            raise ResumeError(f"the checkpoint's MoCo queue holds {queue.shape[0]} keys of {queue.shape[1]} dimensions; "
                              f"task_options.queue_size and projection_dim give {tuple(self.queue.shape)}: resume with "
                              "the values it was trained with")
        self.queue = queue.to(self.queue.device, self.queue.dtype)
        self.queue_ptr, self.keys_seen = int(state["queue_ptr"]), int(state["keys_seen"])

    def method_summary(self) -> str:
        opts = self.options
        return (f"Query and momentum key encoders (momentum {opts.momentum:g}), a queue of {opts.queue_size} keys as "
                f"negatives, InfoNCE with temperature {opts.temperature:g}, a {opts.projection_layers}-layer projection "
                f"head to {opts.projection_dim} dimensions; two random views of each image (resized crops of "
                f"{opts.crop_scale[0]:g}-{opts.crop_scale[1]:g} of the area, rotations up to {opts.max_rotation:g} "
                f"degrees, brightness/contrast jitter {opts.jitter:g}).")
