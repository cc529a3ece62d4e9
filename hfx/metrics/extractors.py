"""Feature extractors: images in, feature vectors (and, for classifiers, logits) out, one interface.

A score such as FID is defined by the network that produces its features, the weights, and how the
images are resized: every extractor records all three in :meth:`FeatureExtractor.describe`, and every hfx
score carries that record. No weights are ever downloaded: pretrained weights come from local files.

- :class:`InceptionFeatureExtractor`: the FID Inception-v3 (pool3, 2048-d; 1008 logits for IS).
- :class:`TimmFeatureExtractor`: any timm model (pre-logits features; its classifier's logits).
- :class:`OpenClipFeatureExtractor`: an open_clip image tower (image embeddings).
- :class:`ModuleFeatureExtractor`: any ``nn.Module`` or transformers ``PreTrainedModel``.
- :func:`load_extractor`: build one from a short spec string (what ``hfx evaluate --extractor`` takes).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hfx.metrics.inception import FID_INCEPTION_SIZE, FIDInceptionV3

RANDOM_INIT = "random-init"
# "bilinear" is pytorch-fid's resize (torch, align_corners=False). The "-antialias" modes filter like PIL
# when downsampling, close to (not bit-equal with) clean-fid's PIL-bicubic resize. torch-fidelity's
# TF1-style bilinear resize is none of these: scores from different resize modes are not comparable.
RESIZE_MODES = ("bilinear", "bilinear-antialias", "bicubic", "bicubic-antialias", "nearest")
# ITU-R 601-2 luma, as PIL's convert("L"): how a model that reads one channel sees a colour image.
_LUMA = (0.299, 0.587, 0.114)


def file_fingerprint(path: str | os.PathLike) -> str:
    """``"sha256:<first 16 hex digits>"`` of a file's bytes: the identity of a weights file in a report."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch checkpoint (read with ``weights_only=True``).

    A checkpoint that wraps its tensors under ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, or a pickle with code in it (refused by weights_only)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"weights file {str(path)!r} cannot be read as tensors ({type(err).__name__}: {first})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return dict(state)


def to_pixels(images) -> torch.Tensor:
    """Images as a float tensor ``[B, C, H, W]`` in [0, 1].

    Accepts a tensor ``[B, C, H, W]`` (uint8 0-255, or float already in [0, 1]), a numpy array
    ``[B, H, W, C]`` or ``[B, H, W]`` (uint8 or float in [0, 1]), or a sequence of PIL images (all one size).
    """
    if isinstance(images, Sequence) and images and hasattr(images[0], "convert"):  # PIL images
        arrays = [np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image) for image in images]
        images = np.stack(arrays)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images[..., None] if images.ndim == 3 else images).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a [B, C, H, W] tensor, a [B, H, W(, C)] array or a list of PIL images, "
                         f"got {type(images).__name__} with shape {tuple(getattr(images, 'shape', ()))}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    images = images.float()
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(f"float images must lie in [0, 1], got values in [{images.min():.3g}, {images.max():.3g}]")
    return images


def resize(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` to ``size`` with one of :data:`RESIZE_MODES` (no-op when already that size)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose from {', '.join(RESIZE_MODES)}")
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    method, _, antialias = mode.partition("-")
    if method == "nearest":
        return F.interpolate(pixels, size=size, mode="nearest")
    out = F.interpolate(pixels, size=size, mode=method, align_corners=False, antialias=bool(antialias))
    return out.clamp(0, 1) if method == "bicubic" else out  # bicubic overshoots


class FeatureExtractor(nn.Module):
    """Base class: ``extractor(images) -> {"features": [B, D], "logits": [B, C]}`` ("logits" for classifiers).

    ``images`` are anything :func:`to_pixels` accepts. Preprocessing: to [0, 1], to the network's channel
    count, resize to ``image_size`` with ``resize_mode``, then ``(x - mean) / std``. Subclasses implement
    :meth:`embed` on preprocessed pixels.

    Attributes recorded with every score: ``name``, ``weights`` (file fingerprint, or ``"random-init"``),
    ``resize_mode``, ``image_size``, ``feature_dim``.
    """

    def __init__(self, *, name: str, weights: str, image_size: tuple[int, int] | int, resize_mode: str,
                 mean: Sequence[float], std: Sequence[float], feature_dim: int, channels: int = 3):
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize_mode!r}; choose from {', '.join(RESIZE_MODES)}")
        self.name = name
        self.weights = weights
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.resize_mode = resize_mode
        self.feature_dim = feature_dim
        self.channels = channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if weights == RANDOM_INIT:
            warnings.warn(f"feature extractor {name} has random weights: its scores are not comparable with "
                          "published numbers (pass a local weights file)", stacklevel=3)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def describe(self) -> dict[str, object]:
        """What defines the numbers this extractor produces (recorded with every score)."""
        height, width = self.image_size
        return {"extractor": self.name, "weights": self.weights, "resize": f"{self.resize_mode} to {height}x{width}",
                "feature_dim": self.feature_dim}

    def preprocess(self, images) -> torch.Tensor:
        pixels = to_pixels(images).to(self.device)
        if pixels.shape[1] == 1 and self.channels == 3:
            pixels = pixels.expand(-1, 3, -1, -1)
        elif pixels.shape[1] == 3 and self.channels == 1:
            pixels = (pixels * pixels.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        elif pixels.shape[1] != self.channels:
            raise ValueError(f"{self.name} reads {self.channels}-channel images, got {pixels.shape[1]} channels")
        return (resize(pixels, self.image_size, self.resize_mode) - self.mean) / self.std

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Preprocessed pixels -> (features ``[B, D]``, logits ``[B, C]`` or None)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images) -> dict[str, torch.Tensor]:
        features, logits = self.embed(self.preprocess(images))
        out = {"features": features.float()}
        if logits is not None:
            out["logits"] = logits.float()
        return out


class InceptionFeatureExtractor(FeatureExtractor):
    """The FID Inception-v3: pool3 features ``[B, 2048]`` and logits ``[B, 1008]``.

    Args:
        weights: path of the ``pt_inception-2015-12-05`` weights (pytorch-fid's
            ``pt_inception-2015-12-05-6726825d.pth``, or the same tensors as ``.safetensors``); ``None``
            builds a random network (with a warning, recorded as ``"random-init"``).
        resize_mode: pytorch-fid resizes with ``"bilinear"`` (the default here); see :data:`RESIZE_MODES`.
    """

    def __init__(self, weights: str | os.PathLike | None = None, resize_mode: str = "bilinear"):
        network = FIDInceptionV3()
        if weights is not None:
            missing, unexpected = network.load_state_dict(load_state_dict(weights), strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise ValueError(f"{weights} is not an FID Inception-v3 state dict: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
        super().__init__(name="inception-v3-fid", weights=file_fingerprint(weights) if weights else RANDOM_INIT,
                         image_size=FID_INCEPTION_SIZE, resize_mode=resize_mode, mean=[0.5] * 3, std=[0.5] * 3,
                         feature_dim=2048)
        self.network = network.eval()

    def embed(self, pixels):
        return self.network(pixels)


class TimmFeatureExtractor(FeatureExtractor):
    """A timm model: pre-logits features and, when it has a classifier, its logits.

    Args:
        model_name: a timm architecture name (``"resnet50"``, ``"vit_small_patch16_224"``, ...), or
            ``"local-dir:<folder>"``: a model saved in timm's Hub layout (``config.json`` +
            ``model.safetensors``, as hfx's image-classification task saves it), weights included.
        weights: local weights file (``.safetensors`` or torch checkpoint) or ``None`` for random weights.
        resize_mode: default: the model's own interpolation at its input size (timm's data config).
        model_kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``, ``in_chans``, ``img_size``).

    Preprocessing follows timm's data config, overridden by an ``hfx_preprocessing.json`` in a local-dir
    folder (the image size, mode and mean/std the model was trained with).
    """

    def __init__(self, model_name: str, weights: str | os.PathLike | None = None, resize_mode: str | None = None,
                 **model_kwargs):
        import timm
        from timm.data import resolve_data_config

        folder = Path(model_name.removeprefix("local-dir:")) if model_name.startswith("local-dir:") else None
        if folder is not None:
            weights_files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
            if not (folder / "config.json").is_file() or not weights_files:
                raise FileNotFoundError(f"{folder} is not a timm model folder (config.json + model.safetensors)")
            weights, state = weights_files[0], None
            model = timm.create_model(model_name, pretrained=True, **model_kwargs)
        else:
            state = load_state_dict(weights) if weights is not None else None
            if state is not None and "num_classes" not in model_kwargs:
                classifier = timm.models.get_pretrained_cfg_value(model_name, "classifier") or ""
                head = state.get(f"{classifier}.weight")
                model_kwargs["num_classes"] = head.shape[0] if head is not None else 0
            try:
                model = timm.create_model(model_name, pretrained=False, **model_kwargs)
            except RuntimeError as err:  # timm's "Unknown model (...)"
                raise ValueError(f"timm cannot build {model_name!r}: {err}") from None
        if state is not None:
            model.load_state_dict(state)
        config = resolve_data_config({}, model=model)
        preprocessing = {"image_size": tuple(config["input_size"][1:]), "channels": config["input_size"][0],
                         "mean": config["mean"], "std": config["std"],
                         "resize_mode": _resize_mode_for(config.get("interpolation", "bicubic"))}
        if folder is not None:
            preprocessing.update(hfx_preprocessing(folder))
        model.eval()
        with torch.no_grad():
            probe = torch.zeros(1, preprocessing["channels"], *preprocessing["image_size"])
            feature_dim = model.forward_head(model.forward_features(probe), pre_logits=True).shape[-1]
        if resize_mode:
            preprocessing["resize_mode"] = resize_mode
        super().__init__(name=f"timm:{model_name}", weights=file_fingerprint(weights) if weights else RANDOM_INIT,
                         feature_dim=feature_dim, **preprocessing)
        self.model = model

    def embed(self, pixels):
        pre_logits = self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)
        classifier = self.model.get_classifier()
        has_classifier = isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity)
        return pre_logits, classifier(pre_logits) if has_classifier else None


def hfx_preprocessing(folder: str | os.PathLike) -> dict[str, object]:
    """The preprocessing recorded in ``<folder>/hfx_preprocessing.json`` (written by hfx's training tasks),
    as :class:`FeatureExtractor` arguments; ``{}`` when the folder has none."""
    path = Path(folder) / "hfx_preprocessing.json"
    if not path.is_file():
        return {}
    recorded = json.loads(path.read_text())
    channels = 1 if recorded.get("mode") == "L" else 3
    out: dict[str, object] = {"channels": channels, "resize_mode": "bilinear-antialias"}
    if "image_size" in recorded:
        size = recorded["image_size"]
        out["image_size"] = (size, size) if isinstance(size, int) else tuple(size)
    for key in ("mean", "std"):
        if key in recorded:
            value = recorded[key]
            out[key] = list(value) if isinstance(value, (list, tuple)) else [float(value)] * channels
    return out


def _resize_mode_for(interpolation: str) -> str:
    return {"bilinear": "bilinear-antialias", "bicubic": "bicubic-antialias", "nearest": "nearest"}.get(
        interpolation, "bicubic-antialias")


class OpenClipFeatureExtractor(FeatureExtractor):
    """An open_clip image tower: image embeddings ``[B, embed_dim]`` (not normalised).

    Args:
        model_name: an open_clip architecture (``"ViT-B-32"``) or ``"local-dir:/path"`` (a folder with
            ``open_clip_config.json`` and weights, which then come from that folder).
        weights: local weights file for a named architecture, or ``None`` for random weights.
    """

    def __init__(self, model_name: str, weights: str | os.PathLike | None = None, resize_mode: str | None = None):
        model, weights_id = load_open_clip(model_name, weights)
        visual = model.visual
        size = visual.image_size
        config = getattr(visual, "preprocess_cfg", {}) or {}
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        super().__init__(name=f"open_clip:{model_name}", weights=weights_id, image_size=size,
                         resize_mode=resize_mode or _resize_mode_for(config.get("interpolation", "bicubic")),
                         mean=config.get("mean", OPENAI_DATASET_MEAN), std=config.get("std", OPENAI_DATASET_STD),
                         feature_dim=int(visual.output_dim))
        self.model = model.eval()

    def embed(self, pixels):
        return self.model.encode_image(pixels), None


def load_open_clip(model_name: str, weights: str | os.PathLike | None = None):
    """Build an open_clip model offline: ``(model, weights identity)``. Random weights warn later."""
    import open_clip

    if model_name.startswith("local-dir:"):
        folder = Path(model_name.removeprefix("local-dir:"))
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no open_clip_config.json")
        checkpoints = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pth"))
        if not checkpoints:
            raise FileNotFoundError(f"{folder} holds no weights file (.safetensors, .bin or .pth)")
        model = open_clip.create_model(model_name, weights_only=True)
        return model, file_fingerprint(checkpoints[0])
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {str(weights)!r} does not exist")
    model = open_clip.create_model(model_name, pretrained=str(weights) if weights else None,
                                   pretrained_text=False, weights_only=True)
    return model, file_fingerprint(weights) if weights else RANDOM_INIT


class ModuleFeatureExtractor(FeatureExtractor):
    """Any ``nn.Module`` or transformers ``PreTrainedModel`` as a feature extractor.

    Args:
        module: the network; called as ``module(pixels)``, or ``module(pixel_values=pixels)`` for a
            ``PreTrainedModel`` (its ``main_input_name``).
        name, weights: what to record (``weights`` e.g. :func:`file_fingerprint` of its weights file).
        image_size, channels, mean, std, resize_mode: the preprocessing the module was trained with.
        feature_key: which output holds the features when the module returns a dict or ``ModelOutput``;
            by default the first of ``pooler_output``, ``image_embeds``, ``last_hidden_state``, the last of
            ``hidden_states`` (both averaged over positions) and ``logits`` found. A tensor output is the
            features. A ``PreTrainedModel`` is called with ``output_hidden_states=True``.
        feature_fn: instead of calling the module, ``feature_fn(module, pixels) -> features`` or
            ``(features, logits)``.
        outputs_are_logits: a tensor output is also the classifier's logits (enables IS).
    """

    def __init__(self, module: nn.Module, *, name: str, weights: str, image_size: int | tuple[int, int],
                 channels: int = 3, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                 resize_mode: str = "bilinear-antialias", feature_key: str | None = None,
                 feature_fn: Callable | None = None, outputs_are_logits: bool = False):
        mean = list(mean) * channels if len(mean) == 1 else list(mean)
        std = list(std) * channels if len(std) == 1 else list(std)
        self._feature_key, self._feature_fn, self._outputs_are_logits = feature_key, feature_fn, outputs_are_logits
        super().__init__(name=name, weights=weights, image_size=image_size, resize_mode=resize_mode, mean=mean,
                         std=std, feature_dim=0, channels=channels)
        self.module = module.eval()
        parameter = next(module.parameters(), None)
        if parameter is not None:
            self.to(parameter.device)
        with torch.no_grad():
            self.feature_dim = self.embed(torch.zeros(1, channels, *self.image_size, device=self.device))[0].shape[-1]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> ModuleFeatureExtractor:
        """A transformers model saved with ``save_pretrained`` (an image classifier if the folder holds one).

        Preprocessing comes from the folder's ``hfx_preprocessing.json`` (hfx's training tasks write it), else
        image size and channels from the config (``image_size``, ``num_channels``), unless given.
        Import the package that registers a custom architecture (``import hfx``) before calling this.
        """
        import transformers

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a saved transformers model (no config.json)")
        try:
            model = transformers.AutoModelForImageClassification.from_pretrained(folder)
        except ValueError:
            model = transformers.AutoModel.from_pretrained(folder)
        config = model.config
        weights_files = sorted(folder.glob("*.safetensors"))
        for key, value in hfx_preprocessing(folder).items():
            kwargs.setdefault(key, value)
        kwargs.setdefault("image_size", getattr(config, "image_size", None) or 224)
        kwargs.setdefault("channels", getattr(config, "num_channels", 3))
        kwargs.setdefault("name", f"{type(model).__name__}:{folder.name}")
        kwargs.setdefault("weights", file_fingerprint(weights_files[0]) if weights_files else RANDOM_INIT)
        return cls(model, **kwargs)

    def embed(self, pixels):
        if self._feature_fn is not None:
            out = self._feature_fn(self.module, pixels)
            return out if isinstance(out, tuple) else (out, None)
        if hasattr(self.module, "main_input_name") and hasattr(self.module, "config"):
            # The last hidden state (penultimate features) of a classifier is what FID wants, not its logits.
            out = self.module(**{self.module.main_input_name: pixels}, output_hidden_states=True)
        else:
            out = self.module(pixels)
        if isinstance(out, torch.Tensor):
            return out.flatten(1), out if self._outputs_are_logits else None
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        keys = [self._feature_key] if self._feature_key else ["pooler_output", "image_embeds", "last_hidden_state",
                                                               "hidden_states", "logits"]
        for key in keys:
            value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
            if isinstance(value, (tuple, list)):  # hidden_states: one tensor per layer
                value, key = value[-1], "last_hidden_state"
            if value is not None:
                features = value.flatten(2).mean(-1) if key == "last_hidden_state" and value.ndim == 4 else value
                features = features.mean(1) if features.ndim == 3 else features
                return features.flatten(1), logits
        raise ValueError(f"{self.name} returned no {' / '.join(keys)} output; set feature_key or feature_fn")


def load_extractor(spec: str, device: str | torch.device = "cpu") -> FeatureExtractor:
    """Build an extractor from a spec string:

    - ``inception:<weights file>`` (``inception:random`` for a random network, with a warning),
    - ``timm:<model name>[:<weights file>]`` or ``timm:local-dir:<folder>``,
    - ``open_clip:<model name>[:<weights file>]`` or ``open_clip:local-dir:<folder>``,
    - ``hf:<folder saved with save_pretrained>``.

    ``:random`` anywhere a weights file goes asks for random weights explicitly.
    """
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"extractor spec {spec!r} needs a kind and an argument, e.g. inception:/path/weights.pth, "
                         "timm:resnet50:/path/weights.safetensors, open_clip:ViT-B-32:/path/weights.bin, hf:/path")
    if kind == "inception":
        extractor = InceptionFeatureExtractor(None if rest == "random" else rest)
    elif kind == "timm" and rest.startswith("local-dir:"):
        extractor = TimmFeatureExtractor(rest)
    elif kind == "timm":
        name, _, weights = rest.partition(":")
        extractor = TimmFeatureExtractor(name, None if weights in ("", "random") else weights)
    elif kind == "open_clip":
        if rest.startswith("local-dir:"):
            extractor = OpenClipFeatureExtractor(rest)
        else:
            name, _, weights = rest.partition(":")
            extractor = OpenClipFeatureExtractor(name, None if weights in ("", "random") else weights)
    elif kind == "hf":
        extractor = ModuleFeatureExtractor.from_pretrained(rest)
    else:
        raise ValueError(f"unknown extractor kind {kind!r} in {spec!r}; use inception, timm, open_clip or hf")
    return extractor.to(device)
