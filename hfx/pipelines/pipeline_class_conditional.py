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
import numbers
import os
from collections.abc import Mapping, Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from hfx.models.noisy_classifier import NoisyClassifier

ClassLabels = int | str | Sequence[int | str] | torch.Tensor


class ClassConditionalPipeline(DiffusionPipeline):
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
        default_guidance_scale: the guidance scale used when ``__call__`` gets none.

    ``from_pretrained`` accepts a local folder or a Hub repo id.

    Example::

        >>> import torch
        >>> from diffusers import DDIMScheduler
        >>> from hfx.pipelines import ClassConditionalPipeline
        >>> pipe = ClassConditionalPipeline.from_pretrained("demo/pipeline")
        >>> pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        >>> images = pipe(["3", "7"], guidance_scale=2.0, num_inference_steps=50,
        ...               generator=torch.Generator().manual_seed(0)).images  # two PIL images
    """

    model_cpu_offload_seq = "unet->classifier"
    _optional_components = ["classifier"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        classifier: NoisyClassifier | None = None,
        class_names: Sequence[str] | Mapping[str, str] | None = None,
        default_guidance_scale: float = 2.0,
    ):
        super().__init__()
        num_class_embeds = unet.config.get("num_class_embeds")
        if not num_class_embeds or num_class_embeds < 2 or unet.config.get("class_embed_type") is not None:
            raise ValueError(
                "unet must be a UNet2DModel with num_class_embeds = num_classes + 1 (the last id is the null "
                f"class) and no class_embed_type; got num_class_embeds={num_class_embeds}, "
                f"class_embed_type={unet.config.get('class_embed_type')!r}"
            )
        num_classes = num_class_embeds - 1
        if isinstance(class_names, Mapping):  # as saved: {"0": name, "1": name, ...}
            if sorted(class_names, key=int) != [str(i) for i in range(len(class_names))]:
                raise ValueError(f"class_names as a mapping needs the ids 0..{len(class_names) - 1} as keys, "
                                 f"got {sorted(class_names)}")
            class_names = [class_names[str(i)] for i in range(len(class_names))]
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if len(class_names) != num_classes:
                raise ValueError(
                    f"class_names has {len(class_names)} entries but the unet has {num_classes} classes "
                    f"(num_class_embeds={num_class_embeds} includes the null class)"
                )
            if len(set(class_names)) != len(class_names):
                raise ValueError(f"class_names must be unique, got {class_names}")
        if classifier is not None and classifier.config.num_classes != num_classes:
            raise ValueError(
                f"classifier predicts {classifier.config.num_classes} classes but the unet has {num_classes}"
            )
        if default_guidance_scale < 0:
            raise ValueError(f"default_guidance_scale must be >= 0, got {default_guidance_scale}")
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)
        stored = None if class_names is None else {str(i): name for i, name in enumerate(class_names)}
        self.register_to_config(class_names=stored, default_guidance_scale=float(default_guidance_scale))

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> ClassConditionalPipeline:
        """Load from a local folder written by ``save_pretrained`` or from a Hub repo id.

        diffusers' downloader expects a Hub pipeline's non-diffusers components to ship their code as
        ``{component}/{module}.py``; hfx components live in the installed ``hfx`` package instead, so for a
        repo id the whole snapshot is downloaded first and the local folder is loaded. ``revision``,
        ``cache_dir``, ``token``, ``force_download`` and ``local_files_only`` apply to that download; other
        keyword arguments (``torch_dtype``, component overrides such as ``scheduler=...``) go to diffusers.

        Raises:
            FileNotFoundError: a missing local folder, a folder without ``model_index.json``, or a repo id
                that cannot be downloaded (or is not cached, offline).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
                raise FileNotFoundError(f"no pipeline folder at {path!r} (and it is not a Hub repo id)")
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import HfHubHTTPError

            download_keys = ("revision", "cache_dir", "token", "force_download", "local_files_only")
            try:
                path = snapshot_download(path, **{key: kwargs.pop(key) for key in download_keys if key in kwargs})
            except HfHubHTTPError as err:
                raise FileNotFoundError(f"cannot download pipeline {path!r} from the Hub: {err}") from err
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"{path!r} has no model_index.json: not a folder written by save_pretrained")
        return super().from_pretrained(path, **kwargs)

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
                or an empty list.
        """
        if isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.dim() > 1:
                raise ValueError(f"class_labels tensor must be 0-d or 1-d integers, got {class_labels.dtype} "
                                 f"of shape {tuple(class_labels.shape)}")
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
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
            elif isinstance(label, bool) or not isinstance(label, numbers.Integral):
                raise ValueError(f"class label {label!r} must be an int id or a class name, not {type(label).__name__}")
            elif not 0 <= label < self.num_classes:
                raise ValueError(
                    f"class id {label} is out of range [0, {self.num_classes}); the null class "
                    f"{self.null_class_id} is not a label: use guidance_scale=0 for unconditional samples"
                )
            else:
                ids.append(int(label))
        return ids

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
        if not 0 < dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio}")
        if "thresholding" not in self.scheduler.config:
            raise ValueError(
                f"{type(self.scheduler).__name__} has no dynamic thresholding; use DDPMScheduler, DDIMScheduler "
                "or DPMSolverMultistepScheduler"
            )
        # Imagen divides by s = max(1, quantile) with no upper bound; the schedulers clamp s to
        # [1, sample_max_value], so an infinite maximum is exactly Imagen's rule.
        return type(self.scheduler).from_config(
            self.scheduler.config, thresholding=True, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=float("inf"),
        )

    # ------------------------------------------------------------------------------------------ sampling
    def check_inputs(
        self, guidance_scale: float, classifier_scale: float, num_inference_steps: int, guidance_rescale: float,
        output_type: str,
    ) -> None:
        """Raise a ValueError naming the first bad argument."""
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (0 = unconditional, 1 = conditional), got {guidance_scale}")
        if classifier_scale < 0:
            raise ValueError(f"classifier_scale must be >= 0, got {classifier_scale}")
        if classifier_scale > 0 and self.classifier is None:
            raise ValueError("classifier_scale > 0 needs a classifier: this pipeline has none")
        if classifier_scale > 0 and getattr(self.scheduler, "alphas_cumprod", None) is None:
            raise ValueError(f"classifier guidance needs a scheduler with alphas_cumprod; "
                             f"{type(self.scheduler).__name__} has none")
        if not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        train_steps = self.scheduler.config.get("num_train_timesteps")
        if train_steps is not None and num_inference_steps > train_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is more than {type(self.scheduler).__name__} can run: "
                f"the model was trained with num_train_timesteps={train_steps}"
            )
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if self.unet.config.out_channels != self.unet.config.in_channels:
            raise ValueError(
                f"the unet predicts {self.unet.config.out_channels} channels for {self.unet.config.in_channels} input "
                "channels; learned-variance outputs are not supported"
            )

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
    ) -> ImagePipelineOutput | tuple:
        r"""Generate one image per entry of ``class_labels``.

        Args:
            class_labels: class ids and/or names (:attr:`class_names`): one, a list, or a 1-d int tensor.
                The batch size is its length.
            guidance_scale: classifier-free guidance weight ``w`` (>= 0). 0 samples the null class alone
                (unconditional), 1 the conditional model alone, larger values push harder towards the class.
                Defaults to ``config.default_guidance_scale``.
            classifier_scale: classifier guidance weight ``s`` (>= 0; needs the ``classifier`` component).
            num_inference_steps: denoising steps, between 1 and the scheduler's ``num_train_timesteps``.
            generator: a ``torch.Generator`` (or one per image) for reproducible noise.
            latents: the starting noise, shape (batch, channels, height, width); drawn from ``generator``
                when ``None``.
            guidance_rescale: in [0, 1]; rescales the guided prediction's std to the conditional one's
                (Lin et al. 2023) to counter oversaturation at high ``guidance_scale``.
            dynamic_thresholding_ratio: in (0, 1]; Imagen's dynamic thresholding of the predicted ``x_0`` at
                this quantile. ``None`` keeps the scheduler's own clipping.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (float array (batch, H, W, C) in [0, 1]) or
                ``"pt"`` (float tensor (batch, C, H, W) in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``.

        Raises:
            ValueError: an unknown class name or out-of-range id, a negative guidance or classifier scale,
                classifier guidance without a classifier, fewer than 1 step or more than the scheduler
                can run, a generator list or ``latents`` whose batch size does not match the labels.
        """
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        self.check_inputs(guidance_scale, classifier_scale, num_inference_steps, guidance_rescale, output_type)
        scheduler = self._sampling_scheduler(dynamic_thresholding_ratio)
        device = self._execution_device
        labels = torch.tensor(self.class_ids(class_labels), device=device, dtype=torch.long)
        batch_size = len(labels)

        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} class labels: give one per image")
        if latents is None:
            image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {batch_size} labels")
        else:
            image = latents.to(device=device, dtype=self.unet.dtype)
        image = image * scheduler.init_noise_sigma

        scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for t in self.progress_bar(scheduler.timesteps):
            model_input = scheduler.scale_model_input(image, t)
            model_output = self._guided_model_output(model_input, t, labels, guidance_scale, guidance_rescale)
            if classifier_scale > 0:
                model_output = self._classifier_guidance(
                    model_output, model_input, t, labels, classifier_scale, scheduler.alphas_cumprod,
                    scheduler.config.prediction_type,
                )
            image = scheduler.step(model_output, t, image, **step_kwargs).prev_sample

        image = (self.decode_latents(image) / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
