"""Helpers shared by the pipelines, the ``hfx sample`` command and the demo: scheduler swap and grids."""

from __future__ import annotations

import math
from collections.abc import Sequence

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin
from diffusers.utils import make_image_grid
from PIL import Image

# Short names for the schedulers every hfx pipeline is tested with.
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}


def image_output(pipe, images, output_type: str, return_dict: bool):
    """The end of every hfx image pipeline's call: ``images`` (N, C, H, W) in [-1, 1] -> [0, 1] as ``"pt"``, ``"np"``
    (N, H, W, C) or ``"pil"``; offload hooks freed; an ``ImagePipelineOutput`` or ``(images,)``."""
    from diffusers import ImagePipelineOutput

    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type != "pt":
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            images = pipe.numpy_to_pil(images)
    pipe.maybe_free_model_hooks()
    return ImagePipelineOutput(images=images) if return_dict else (images,)


def scheduler_from_name(name: str, config) -> SchedulerMixin:
    """A scheduler of the named kind (``ddpm``, ``ddim``, ``dpm++``) built from another scheduler's
    config, so it keeps the training noise schedule and ``prediction_type``.

    Raises:
        ValueError: an unknown name.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)


def class_grid(pipe, class_labels: Sequence, per_class: int, **call_kwargs) -> Image.Image:
    """Sample ``per_class`` images for each entry of ``class_labels`` and lay them out as a grid.

    Several classes give one row per class; a single class gives a near-square grid. ``call_kwargs`` go
    to ``pipe(...)`` (``guidance_scale``, ``num_inference_steps``, ``generator``, ...).

    Returns:
        An RGB PIL image of (rows * H) x (cols * W) pixels.
    """
    if per_class < 1:
        raise ValueError(f"the number of images per class must be >= 1, got {per_class}")
    labels = [label for label in class_labels for _ in range(per_class)]
    images = pipe(labels, output_type="pil", **call_kwargs).images
    if len(class_labels) > 1:
        rows, cols = len(class_labels), per_class
    else:
        cols = math.ceil(math.sqrt(per_class))
        rows = math.ceil(per_class / cols)
        images = images + [Image.new(images[0].mode, images[0].size)] * (rows * cols - len(images))
    return make_image_grid(images, rows=rows, cols=cols)
