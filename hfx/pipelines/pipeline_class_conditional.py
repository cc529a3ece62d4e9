"""Class-conditional image generation with classifier-free and classifier guidance.

diffusers has the UNet and the schedulers but no pipeline for a small class-conditional model with
guidance: ``DDPMPipeline`` never passes class labels and ``DiTPipeline`` hard-codes the null class 1000.
This pipeline drives a ``UNet2DModel`` whose ``num_class_embeds`` is ``num_classes + 1``: ids
``0 .. num_classes - 1`` are the classes and the last id is the null class that training substitutes
for the label with some probability (label dropout), so one network gives both ``eps(x_t, y)`` and
``eps(x_t, null)``.

Guidance, per denoising step (Ho & Salimans 2022; Dhariwal & Nichol 2021):

    out       = out(x_t, null) + w * (out(x_t, y) - out(x_t, null))          # classifier-free, w = guidance_scale
    eps_hat   = eps - s * sqrt(1 - alpha_bar_t) * grad_x log p(y | x_t, t)    # classifier, s = classifier_scale

Taming high guidance (small models oversaturate quickly as ``w`` grows):

- ``guidance_rescale`` (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed",
  section 3.4) matches the per-image standard deviation of the guided output to that of the conditional
  output, then mixes by the given factor; diffusers' own ``rescale_noise_cfg`` is used.
- ``dynamic_thresholding_ratio`` (Imagen, Saharia et al. 2022): at each step the predicted ``x_0`` is
  clipped to the ratio-quantile ``s`` of its absolute values and divided by ``s`` (when ``s > 1``). The
  schedulers already implement this on ``x_0`` (``thresholding=True``), so the pipeline runs a copy of its
  scheduler with thresholding switched on rather than re-implementing it; schedulers without that option
  raise a ValueError.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from hfx.models.noisy_classifier import NoisyClassifier
from hfx.pipelines.loading import FolderOrRepoLoading, _hub_error_reason  # noqa: F401  (its old home)

ClassLabels = int | str | Sequence[int | str] | torch.Tensor | np.ndarray
StepEndCallback = Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | PipelineCallback | MultiPipelineCallbacks


def _checked_number(name: str, value, allowed: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float when it is a finite real number (not a bool) for which ``ok`` holds.

    Raises:
        ValueError: naming ``name`` and what is ``allowed``; NaN and infinities are never allowed.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def _checked_count(name: str, value, allowed: str = "an integer >= 1") -> int:
    """``value`` as an int when it is an integer (not a bool) >= 1, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


class ClassConditionalPipeline(FolderOrRepoLoading, DiffusionPipeline):
    r"""Pipeline for class-conditional generation with classifier-free and classifier guidance.

    Components:
        unet (``UNet2DModel``): the denoiser, built with ``num_class_embeds = num_classes + 1``; the last
            class id is the null class (no condition).
        scheduler (``SchedulerMixin``): a diffusers scheduler with ``alphas_cumprod``, e.g.
            ``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``. Its ``prediction_type``
            (``epsilon``, ``v_prediction`` or ``sample``) says what the UNet predicts. Swap with
            ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``.
        classifier (``NoisyClassifier``, optional): a noise-aware classifier ``p(y | x_t, t)`` taking
            ``(x_t, t)`` and returning ``logits`` of shape (batch, num_classes), for classifier guidance.

    Config (saved in ``model_index.json``):
        class_names: one name per class id, so that ``pipe(["cat", "dog"])`` works; ``None`` for ids only.
            Stored as an id -> name mapping (``{"0": "cat", ...}``, like transformers' ``id2label``): diffusers
            reads every list in ``model_index.json`` as a component, so a list would break Hub loading of
            remote-code exports. :attr:`class_names` gives the names as a list.
        default_guidance_scale: the guidance scale used when ``__call__`` gets none (a finite number >= 0).

    ``from_pretrained`` accepts a local folder or a Hub repo id; after ``import hfx``,
    ``DiffusionPipeline.from_pretrained`` returns this class for a folder or repo saved from it.

    Example::

        >>> import torch
        >>> from diffusers import DDIMScheduler
        >>> from hfx.pipelines import ClassConditionalPipeline
        >>> pipe = ClassConditionalPipeline.from_pretrained("demo/pipeline")
        >>> pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        >>> images = pipe(["3", "7"], guidance_scale=2.0, num_inference_steps=50, num_images_per_prompt=4,
        ...               generator=torch.Generator().manual_seed(0)).images  # 8 PIL images: four 3s, four 7s
    """

    model_cpu_offload_seq = "unet->classifier"
    _optional_components = ["classifier"]
    # What `callback_on_step_end` may read and replace at the end of each step: the current noisy sample
    # x_{t-1} and the class id of every image, shape (batch,).
    _callback_tensor_inputs = ["latents", "class_labels"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        classifier: NoisyClassifier | None = None,
        class_names: Sequence[str] | Mapping[str, str] | None = None,
        default_guidance_scale: float = 2.0,
    ):
        super().__init__()
        config = getattr(unet, "config", None)
        num_class_embeds = config.get("num_class_embeds") if isinstance(config, Mapping) else None
        class_embed_type = config.get("class_embed_type") if isinstance(config, Mapping) else None
        if (isinstance(num_class_embeds, bool) or not isinstance(num_class_embeds, int) or num_class_embeds < 2
                or class_embed_type is not None):
            raise ValueError(
                "unet must be a UNet2DModel with num_class_embeds = num_classes + 1 (the last id is the null "
                f"class) and no class_embed_type; got a {type(unet).__name__} with num_class_embeds={num_class_embeds}, "
                f"class_embed_type={class_embed_type!r}"
            )
        if not isinstance(scheduler, SchedulerMixin):
            raise ValueError(f"scheduler must be a diffusers scheduler (a SchedulerMixin such as DDPMScheduler), "
                             f"got {type(scheduler).__name__}")
        num_classes = num_class_embeds - 1
        class_names = self._checked_class_names(class_names, num_classes, num_class_embeds)
        if classifier is not None:
            classifier_classes = getattr(getattr(classifier, "config", None), "num_classes", None)
            if not isinstance(classifier, torch.nn.Module) or classifier_classes is None:
                raise ValueError("classifier must be a NoisyClassifier (a torch module with config.num_classes) or "
                                 f"None, got {type(classifier).__name__}")
            if classifier_classes != num_classes:
                raise ValueError(f"classifier predicts {classifier_classes} classes but the unet has {num_classes}")
        default_guidance_scale = _checked_number(
            "default_guidance_scale", default_guidance_scale, "a finite number >= 0 (0 = unconditional, 1 = conditional)",
            lambda w: w >= 0)
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)
        stored = None if class_names is None else {str(i): name for i, name in enumerate(class_names)}
        self.register_to_config(class_names=stored, default_guidance_scale=default_guidance_scale)

    @staticmethod
    def _checked_class_names(class_names, num_classes: int, num_class_embeds: int) -> list[str] | None:
        """``class_names`` (a list of names, or the saved id -> name mapping) as a list, checked."""
        if class_names is None:
            return None
        if isinstance(class_names, Mapping):  # as saved: {"0": name, "1": name, ...}
            if sorted(class_names, key=str) != sorted(str(i) for i in range(len(class_names))):
                raise ValueError(f"class_names as a mapping needs the ids 0..{len(class_names) - 1} as keys, "
                                 f"got {sorted(class_names, key=str)}")
            class_names = [class_names[str(i)] for i in range(len(class_names))]
        elif isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
            raise ValueError(f"class_names must be a list of strings, one per class, or None; got "
                             f"{type(class_names).__name__} {class_names!r}")
        bad = [name for name in class_names if not isinstance(name, str) or not name]
        if bad:
            raise ValueError(f"class_names must be non-empty strings, got {bad!r}")
        if len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries but the unet has {num_classes} classes "
                f"(num_class_embeds={num_class_embeds} includes the null class)"
            )
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be unique, got {list(class_names)}")
        return list(class_names)

    # ------------------------------------------------------------------------------------------ model card
    #: The Hub pipeline tag of the model card (the closest one for class-conditional image generation).
    hub_pipeline_tag = "unconditional-image-generation"

    @classmethod
    def hub_card_usage(cls, folder: str | os.PathLike) -> str:
        """The model card's line that uses a loaded pipeline ``pipe`` once, for the pipeline saved in ``folder``."""
        import json

        with open(os.path.join(folder, "unet", "config.json")) as handle:
            num_classes = json.load(handle)["num_class_embeds"] - 1
        labels = list(range(min(4, num_classes)))
        return f"images = pipe({labels}, num_inference_steps=25).images  # one PIL image per class id"

    @classmethod
    def hub_card_samples(cls, folder: str | os.PathLike, seed: int = 0) -> tuple[torch.Tensor, int]:
        """The model card's sample grid of the pipeline saved in ``folder``: four DDIM-25 samples for each of
        (up to) the first ten classes at the default guidance, as ``(images (N, C, H, W) in [-1, 1], rows)``."""
        from diffusers import DDIMScheduler

        pipe = cls.from_pretrained(folder)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        classes = list(range(min(pipe.num_classes, 10)))
        images = pipe(classes, num_images_per_prompt=4, num_inference_steps=25, output_type="pt",
                      generator=torch.Generator().manual_seed(seed)).images
        return images * 2 - 1, len(classes)

    # ------------------------------------------------------------------------------------------ labels
    @property
    def class_names(self) -> list[str] | None:
        """The class names in id order, or None when the pipeline has ids only."""
        stored = self.config.class_names
        return None if stored is None else [stored[str(i)] for i in range(len(stored))]

    @property
    def num_classes(self) -> int:
        """Number of real classes (the UNet's class embeddings minus the null class)."""
        return self.unet.config.num_class_embeds - 1

    @property
    def null_class_id(self) -> int:
        """The class id that means "no condition" (the last embedding)."""
        return self.num_classes

    def class_ids(self, class_labels: ClassLabels) -> list[int]:
        """Resolve class names and/or ids to a list of ids in ``[0, num_classes)``.

        Raises:
            ValueError: a name that is not in :attr:`class_names`, an id out of range, a bool or float,
                an empty list, or something that is not a label or a list of labels (None, a dict, ...).
        """
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            is_torch = isinstance(class_labels, torch.Tensor)
            if class_labels.is_floating_point() if is_torch else class_labels.dtype.kind == "f":
                raise ValueError(f"class_labels must be integer ids, got a {class_labels.dtype} array")
            if class_labels.ndim > 1:
                raise ValueError(f"class_labels must be 0-d or 1-d, got shape {tuple(class_labels.shape)}")
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (numbers.Integral, str)):
            class_labels = [class_labels]
        elif not isinstance(class_labels, Sequence):
            raise ValueError("class_labels must be a class id, a class name, a list of them or a 1-d integer tensor, "
                             f"got {type(class_labels).__name__}")
        labels = list(class_labels)
        if not labels:
            raise ValueError("class_labels is empty: give at least one class id or name")
        names = self.class_names or []
        ids = []
        for label in labels:
            if isinstance(label, str):
                if label not in names:
                    known = f"one of {names}" if names else f"an id in [0, {self.num_classes}) (this pipeline has no class names)"
                    raise ValueError(f"unknown class name {label!r}: expected {known}")
                ids.append(names.index(label))
            elif isinstance(label, (bool, np.bool_)) or not isinstance(label, numbers.Integral):
                raise ValueError(f"class label {label!r} must be an int id or a class name, not {type(label).__name__}")
            elif not 0 <= label < self.num_classes:
                raise ValueError(
                    f"class id {label} is out of range [0, {self.num_classes}); the null class "
                    f"{self.null_class_id} is not a label: use guidance_scale=0 for unconditional samples"
                )
            else:
                ids.append(int(label))
        return ids

    # ------------------------------------------------------------------------------------------ call state
    # As in diffusers' StableDiffusionPipeline: set by `__call__` and read at every step, so that a
    # `callback_on_step_end` can change them mid-run (e.g. `pipe._guidance_scale = 1.0` ends guidance,
    # `pipe._interrupt = True` skips the remaining steps).
    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale of the current (or last) call."""
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        """The guidance rescale factor of the current (or last) call."""
        return self._guidance_rescale

    @property
    def classifier_scale(self) -> float:
        """The classifier guidance scale of the current (or last) call."""
        return self._classifier_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether a step needs both the conditional and the null-class prediction: any scale but 0 (the null
        class alone) and 1 (the conditional model alone). Note that diffusers' text pipelines switch guidance
        on only above 1; here 0 < scale < 1 interpolates between the unconditional and conditional model."""
        return self._guidance_scale not in (0.0, 1.0)

    @property
    def num_timesteps(self) -> int:
        """The number of denoising steps of the current (or last) call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """True once a callback has set ``pipe._interrupt = True``: the remaining steps are skipped and the
        current sample is decoded."""
        return self._interrupt

    # ------------------------------------------------------------------------------------------ guidance
    def _guided_model_output(
        self, model_input: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance_scale: float,
        guidance_rescale: float,
    ) -> torch.Tensor:
        """The UNet's prediction under classifier-free guidance, in the scheduler's prediction type.

        Scale 1 is the conditional model alone and scale 0 the null class alone (one UNet call each);
        any other scale runs the conditional and null halves in ONE batched UNet call.
        """
        if guidance_scale == 1.0:
            return self.unet(model_input, t, class_labels=labels).sample
        null = torch.full_like(labels, self.null_class_id)
        if guidance_scale == 0.0:
            return self.unet(model_input, t, class_labels=null).sample

        both = self.unet(torch.cat([model_input, model_input]), t, class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        if guidance_rescale > 0:
            guided = rescale_noise_cfg(guided, cond, guidance_rescale=guidance_rescale)
        return guided

    def _classifier_guidance(
        self, model_output: torch.Tensor, model_input: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
        classifier_scale: float, alphas_cumprod: torch.Tensor, prediction_type: str,
    ) -> torch.Tensor:
        """Add ``classifier_scale * grad log p(y | x_t, t)`` to the score, in the scheduler's prediction type.

        With ``x_t = alpha x_0 + sigma eps`` (``alpha = sqrt(alpha_bar_t)``, ``sigma = sqrt(1 - alpha_bar_t)``)
        the score is ``-eps / sigma``, so guidance shifts ``eps`` by ``d_eps = -s sigma grad``. At fixed
        ``x_t`` the other parametrisations move with it: ``v = (eps - sigma x_t) / alpha`` shifts by
        ``d_eps / alpha`` and ``x_0 = (x_t - sigma eps) / alpha`` by ``-sigma d_eps / alpha``.
        """
        with torch.enable_grad():
            x = model_input.detach().requires_grad_(True)
            logits = self.classifier(x, t).logits.float()
            log_prob = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).sum()
            grad = torch.autograd.grad(log_prob, x)[0]

        alpha_bar = alphas_cumprod.to(model_output.device)[t.long()].to(torch.float32)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        d_eps = -classifier_scale * sigma * grad.float()
        if prediction_type == "epsilon":
            shift = d_eps
        elif prediction_type == "v_prediction":
            shift = d_eps / alpha
        elif prediction_type == "sample":
            shift = -sigma * d_eps / alpha
        else:
            raise ValueError(f"classifier guidance does not support prediction_type {prediction_type!r}")
        return model_output + shift.to(model_output.dtype)

    def _sampling_scheduler(self, dynamic_thresholding_ratio: float | None) -> SchedulerMixin:
        """The scheduler to run: the pipeline's own, or a copy with dynamic thresholding switched on."""
        if dynamic_thresholding_ratio is None:
            return self.scheduler
        # Imagen divides by s = max(1, quantile) with no upper bound; the schedulers clamp s to
        # [1, sample_max_value], so an infinite maximum is exactly Imagen's rule.
        return type(self.scheduler).from_config(
            self.scheduler.config, thresholding=True, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=float("inf"),
        )

    # ------------------------------------------------------------------------------------------ sampling
    def check_inputs(
        self, guidance_scale: float, classifier_scale: float, num_inference_steps: int, guidance_rescale: float,
        output_type: str, dynamic_thresholding_ratio: float | None = None, num_images_per_prompt: int = 1,
        return_dict: bool = True, callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> None:
        """Raise a ValueError naming the first bad argument and what it allows (NaN and inf never pass)."""
        _checked_number("guidance_scale", guidance_scale,
                        ">= 0 (a finite number; 0 = unconditional, 1 = conditional)", lambda w: w >= 0)
        _checked_number("classifier_scale", classifier_scale, ">= 0 (a finite number)", lambda s: s >= 0)
        if classifier_scale > 0 and self.classifier is None:
            raise ValueError("classifier_scale > 0 needs a classifier: this pipeline has none")
        if classifier_scale > 0 and getattr(self.scheduler, "alphas_cumprod", None) is None:
            raise ValueError(f"classifier guidance needs a scheduler with alphas_cumprod; "
                             f"{type(self.scheduler).__name__} has none")
        _checked_number("guidance_rescale", guidance_rescale, "in [0, 1]", lambda r: 0 <= r <= 1)
        if dynamic_thresholding_ratio is not None:
            _checked_number("dynamic_thresholding_ratio", dynamic_thresholding_ratio, "in (0, 1] or None",
                            lambda q: 0 < q <= 1)
            if "thresholding" not in self.scheduler.config:
                raise ValueError(
                    f"{type(self.scheduler).__name__} has no dynamic thresholding; use DDPMScheduler, DDIMScheduler "
                    "or DPMSolverMultistepScheduler"
                )
        _checked_count("num_inference_steps", num_inference_steps)
        train_steps = self.scheduler.config.get("num_train_timesteps")
        if train_steps is not None and num_inference_steps > train_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is more than {type(self.scheduler).__name__} can run: "
                f"the model was trained with num_train_timesteps={train_steps}"
            )
        _checked_count("num_images_per_prompt", num_images_per_prompt, "an integer >= 1 (images per class label)")
        if not isinstance(output_type, str) or output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if not isinstance(return_dict, bool):
            raise ValueError(f"return_dict must be True or False, got {return_dict!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("callback_on_step_end must be a function (pipe, step_index, timestep, callback_kwargs) -> "
                             f"dict, a PipelineCallback or a MultiPipelineCallbacks; got {type(callback_on_step_end).__name__}")
        if isinstance(callback_on_step_end_tensor_inputs, str) or not isinstance(callback_on_step_end_tensor_inputs, Sequence):
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be a list of names from "
                             f"{self._callback_tensor_inputs}, got {callback_on_step_end_tensor_inputs!r}")
        if not all(k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs):  # diffusers' check
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found "
                f"{[k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]}"
            )
        if self.unet.config.out_channels != self.unet.config.in_channels:
            raise ValueError(
                f"the unet predicts {self.unet.config.out_channels} channels for {self.unet.config.in_channels} input "
                "channels; learned-variance outputs are not supported"
            )

    def prepare_latents(
        self, num_labels: int, num_images_per_prompt: int, generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None, device: torch.device, init_noise_sigma: float,
    ) -> torch.Tensor:
        """The starting noise x_T of shape (num_labels * num_images_per_prompt, channels, *sample_size), scaled
        by the scheduler's ``init_noise_sigma``: drawn from ``generator``, or ``latents`` when given.

        Raises:
            ValueError: a generator that is not a ``torch.Generator`` or a list of one per image, or ``latents``
                that are not a finite floating-point tensor of that shape.
        """
        batch_size = num_labels * num_images_per_prompt
        images = f"{num_labels} class labels x num_images_per_prompt={num_images_per_prompt} = {batch_size} images"
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for {images}: give one per image")
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(f"generator must hold torch.Generator objects, got {[type(g).__name__ for g in generator]}")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, a list of one per image, or None; got "
                             f"{type(generator).__name__}")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise ValueError(f"latents must be a floating-point torch.Tensor of shape {shape}, got "
                             f"{type(latents).__name__} {getattr(latents, 'dtype', '')}".rstrip())
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {images}")
        elif not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values: the starting noise must be finite")
        else:
            latents = latents.to(device=device, dtype=self.unet.dtype)
        return latents * init_noise_sigma

    def _step_end_callback(
        self, callback: StepEndCallback, tensor_inputs: Sequence[str], step_index: int, t: torch.Tensor,
        tensors: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Call ``callback(pipe, step_index, timestep, callback_kwargs)`` with the named ``tensors``, as diffusers'
        pipelines do, and return ``tensors`` with those the callback returned put in their place."""
        outputs = callback(self, step_index, t, {name: tensors[name] for name in tensor_inputs})
        if not isinstance(outputs, Mapping):
            raise ValueError(f"callback_on_step_end must return a dict (the callback_kwargs it was given, changed "
                             f"or not), got {type(outputs).__name__}")
        return {name: outputs.get(name, value) for name, value in tensors.items()}

    def decode_latents(self, sample: torch.Tensor) -> torch.Tensor:
        """The denoised sample as images in [-1, 1]: pixel space already here; latent pipelines decode."""
        return sample

    @torch.no_grad()
    def __call__(
        self,
        class_labels: ClassLabels,
        guidance_scale: float | None = None,
        classifier_scale: float = 0.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        guidance_rescale: float = 0.0,
        dynamic_thresholding_ratio: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_images_per_prompt: int = 1,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""Generate ``num_images_per_prompt`` images for each entry of ``class_labels``.

        Args:
            class_labels (`int`, `str`, `list` or 1-d integer `torch.Tensor`):
                Class ids and/or names (:attr:`class_names`): one, a list, or a 1-d int tensor.
            guidance_scale (`float`, *optional*, defaults to `config.default_guidance_scale`):
                Classifier-free guidance weight ``w``, a finite number >= 0. 0 samples the null class alone
                (unconditional), 1 the conditional model alone, larger values push harder towards the class.
            classifier_scale (`float`, *optional*, defaults to 0.0):
                Classifier guidance weight ``s``, a finite number >= 0 (> 0 needs the ``classifier`` component).
            num_inference_steps (`int`, *optional*, defaults to 50):
                Denoising steps, between 1 and the scheduler's ``num_train_timesteps``.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                A generator (or one per image: ``len(class_labels) * num_images_per_prompt`` of them) for
                reproducible noise.
            latents (`torch.Tensor`, *optional*):
                The starting noise, a finite float tensor of shape
                (``len(class_labels) * num_images_per_prompt``, channels, height, width); drawn from ``generator``
                when ``None``.
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                In [0, 1]; rescales the guided prediction's std to the conditional one's (Lin et al. 2023) to
                counter oversaturation at high ``guidance_scale``.
            dynamic_thresholding_ratio (`float`, *optional*):
                In (0, 1]; Imagen's dynamic thresholding of the predicted ``x_0`` at this quantile. ``None`` keeps
                the scheduler's own clipping.
            output_type (`str`, *optional*, defaults to `"pil"`):
                ``"pil"`` (list of PIL images), ``"np"`` (float array (batch, H, W, C) in [0, 1]) or ``"pt"``
                (float tensor (batch, C, H, W) in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an ``ImagePipelineOutput`` rather than a tuple.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                The number of images to generate per class label (an integer >= 1). Each label is repeated in
                place, as diffusers repeats prompts: ``pipe([3, 7], num_images_per_prompt=2)`` gives the images of
                labels ``[3, 3, 7, 7]``.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called at the end of each denoising step as ``callback_on_step_end(pipe, step_index, timestep,
                callback_kwargs)``; ``callback_kwargs`` holds the tensors named by
                ``callback_on_step_end_tensor_inputs`` and the callback returns a dict whose tensors replace the
                pipeline's (e.g. ``{"latents": ...}``). It may also set ``pipe._interrupt = True`` to skip the
                remaining steps, or ``pipe._guidance_scale`` to change guidance for the steps that follow.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                The tensors passed in ``callback_kwargs``, from :attr:`_callback_tensor_inputs`: ``"latents"``
                (the sample after the step) and ``"class_labels"`` (the id of each image, shape (batch,)). A
                ``PipelineCallback`` or ``MultiPipelineCallbacks`` brings its own ``tensor_inputs`` instead.

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``: ``len(class_labels) * num_images_per_prompt``
            images, those of one label adjacent.

        Raises:
            ValueError: an unknown class name or out-of-range id; a guidance, classifier or rescale scale or a
                thresholding ratio that is NaN, infinite, of the wrong type or out of its range; classifier
                guidance without a classifier; fewer than 1 step or more than the scheduler can run; a
                ``num_images_per_prompt`` that is not an integer >= 1; a generator list or ``latents`` whose batch
                size does not match; tensor inputs not in :attr:`_callback_tensor_inputs`.
        """
        # 0. Defaults, as in diffusers: a PipelineCallback names the tensors it needs itself.
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check the arguments; the loop reads guidance from the pipeline, where a callback may change it.
        self.check_inputs(guidance_scale, classifier_scale, num_inference_steps, guidance_rescale, output_type,
                          dynamic_thresholding_ratio, num_images_per_prompt, return_dict, callback_on_step_end,
                          callback_on_step_end_tensor_inputs)
        self._guidance_scale, self._guidance_rescale = float(guidance_scale), float(guidance_rescale)
        self._classifier_scale = float(classifier_scale)
        self._interrupt = False
        scheduler = self._sampling_scheduler(dynamic_thresholding_ratio)
        device = self._execution_device

        # 2. One label per image: each class label repeated num_images_per_prompt times, in place.
        ids = self.class_ids(class_labels)
        labels = torch.tensor(ids, device=device, dtype=torch.long).repeat_interleave(num_images_per_prompt)

        # 3. The starting noise x_T.
        latents = self.prepare_latents(len(ids), num_images_per_prompt, generator, latents, device,
                                       scheduler.init_noise_sigma)

        # 4. Denoise: guided prediction, scheduler step, then the step-end callback.
        scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(scheduler.timesteps)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            if self.interrupt:
                continue
            model_input = scheduler.scale_model_input(latents, t)
            model_output = self._guided_model_output(model_input, t, labels, self.guidance_scale, self.guidance_rescale)
            if self.classifier_scale > 0:
                model_output = self._classifier_guidance(
                    model_output, model_input, t, labels, self.classifier_scale, scheduler.alphas_cumprod,
                    scheduler.config.prediction_type,
                )
            latents = scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                tensors = self._step_end_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, i, t,
                                                  {"latents": latents, "class_labels": labels})
                latents, labels = tensors["latents"], tensors["class_labels"]

        # 5. Decode to images in [0, 1].
        image = (self.decode_latents(latents) / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
