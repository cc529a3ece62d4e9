"""Diffusion pipelines: one ``DiffusionPipeline`` subclass per ``pipeline_<name>.py``.

``import hfx`` imports this package, which puts every pipeline and component module in ``sys.modules``:
diffusers looks components up there when it loads a saved pipeline and never imports them itself.
"""

from hfx.pipelines.pipeline_class_conditional import ClassConditionalPipeline
from hfx.pipelines.pipeline_cyclegan import CycleGANPipeline
from hfx.pipelines.pipeline_gan import GANPipeline
from hfx.pipelines.pipeline_latent_diffusion import LatentDiffusionPipeline
from hfx.pipelines.pipeline_text_to_image import TextToImagePipeline
from hfx.pipelines.utils import SCHEDULERS, class_grid, scheduler_from_name

__all__ = ["SCHEDULERS", "ClassConditionalPipeline", "CycleGANPipeline", "GANPipeline", "LatentDiffusionPipeline",
           "TextToImagePipeline", "class_grid", "scheduler_from_name"]
