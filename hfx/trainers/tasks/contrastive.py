"""``contrastive``: CLIP-style image-text training of a ``transformers.VisionTextDualEncoderModel``.

The model is transformers' own dual encoder: a vision tower built from a config (``vision_model``, a
transformers model type such as ``vit`` or ``convnext``, random weights, 3 channels; greyscale images are
converted to RGB by the image processor; a config without ``hidden_size``, as ConvNeXt's, gets it set to its
last stage's width ``hidden_sizes[-1]``, the width of its layernormed mean-pooled ``pooler_output`` that the
dual encoder projects: it is saved in config.json and the stock class reloads it), the REAL pretrained text tower of ``text_encoder`` (all-MiniLM-L6-v2 by default, loaded
offline from its PyPI package), and two linear projections to ``projection_dim`` with a learnt logit scale.
The loss is CLIP's symmetric InfoNCE (:func:`hfx.losses.contrastive.clip_loss`: it gathers the embeddings of
every process with local gradients, so 2 processes x B train exactly as 1 process x 2B, and clamps the scale
at ln 100). The engine's optimizer gives the logit scale, biases and norms no weight decay (tensors of rank
< 2).

**Pooling.** ``VisionTextDualEncoderModel`` reads both towers' ``pooler_output``. For BERT that is the stock
pooler, ``tanh(dense(h_CLS))``. all-MiniLM-L6-v2 was tuned with MEAN pooling, but its checkpoint does carry
the pooler weights (``pooler.dense.*`` of its base, nreimers/MiniLM-L6-H384-uncased), so the tower loads
completely and the pooler is real, just not tuned for sentence similarity. hfx keeps it (and trains it, with
the projection): the saved folder is then a stock ``VisionTextDualEncoderModel`` that
``pipeline("zero-shot-image-classification")`` serves without hfx (transformers logs that the class is "not
supported" by that pipeline, which is not in its model table, then runs it correctly). Mean pooling would need a model class
of hfx's own, i.e. remote code.

**Locked or tuned text tower (LiT).** Use the recipe's ``freeze:`` section. ``freeze: {train_only:
[vision_model, visual_projection, text_projection, logit_scale, text_model.pooler]}`` locks the text
encoder (embeddings and layers) and tunes the rest, LiT-style (Zhai et al. 2022, with the roles of the
towers swapped: here the pretrained tower is the text one). A locked encoder is run ONCE, before training,
in eval mode (no dropout: it is served as it was trained), and each caption's final CLS state is kept, so a
step costs only the vision tower, the pooler and the projections. Leave ``freeze:`` out to tune everything,
or train the top layers with a regex (``text_model.encoder.layer.5``); then the text tower runs every step.

**Caption augmentation** (``caption_variants: V``, default 1: off). Each train example gets V captions of
its own label (digits 0-9) and attributes (the :data:`hfx.data.builtin.CAPTION_ATTRIBUTES` columns, as
``digits-captions`` has; other datasets are refused), written by :func:`hfx.data.builtin.caption_for`: the
first is the dataset's own caption, the others distinct template / phrasing combinations drawn once from a
generator seeded with the run's ``seed`` (deterministic; they differ from the own caption whenever the
combinations allow). All V are tokenised once (and, with a locked text tower, encoded once into the cache),
and each step picks one per example of the batch with the GLOBAL torch RNG (``torch.randint``), which
checkpoints restore, so a resumed run is exact. With a tuned text tower the chosen variant's tokens are run
through the tower that step. Only the training side changes: evaluation uses the eval split's own captions.
Each process draws its own picks, so (as with ``random_shift``) such a run is not split-invariant across
processes.

Evaluation (on the whole eval split, on every process; the numbers are the same on each):

- ``zero_shot_accuracy``: the class whose prompt ensemble (``zero_shot_templates`` over ``class_names``,
  each prompt's normalised embedding averaged per class, as in CLIP's ImageNet evaluation) is the closest;
- ``zero_shot_accuracy_single``: the same with the one template ``"This is a photo of {}."`` that
  ``pipeline("zero-shot-image-classification")`` uses by default (the saved folder reproduces its
  predictions exactly; tested in a process without hfx);
- ``zero_shot_<attribute>_accuracy``: each of ``attribute_templates`` (``size``, ``position``,
  ``thickness`` on digits-captions) classified zero-shot from prompts of its values;
- ``image_to_text_recall@1`` / ``text_to_image_recall@1``: retrieval among the eval split's pairs (a hit is
  the image's own caption text, so repeated captions count);
- ``logit_scale`` (the scale, ``exp`` of the clamped parameter), and the frozen image embeddings' k-NN, linear
  probe and ``feature_std`` collapse monitor (:func:`hfx.trainers.tasks._ssl.representation_metrics`).

Saved (``final/``): ``config.json`` + ``model.safetensors`` of the ``VisionTextDualEncoderModel``, the processor
(``ViTImageProcessor`` that converts to RGB, resizes to the training size and normalises as training did,
and the text tower's tokenizer), ``hfx_preprocessing.json`` and ``zero_shot.json`` (class names, the
ensemble's templates, the attribute prompts) to rebuild the ensemble classifier.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hfx.losses.contrastive import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, clip_loss
from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks._image_tasks import ImageColumns
from hfx.trainers.tasks.base import Task, TaskData, register_task
from hfx.trainers.tasks.image_classification import random_shift

#: The template ``transformers.pipeline("zero-shot-image-classification")`` formats labels with by default.
PIPELINE_TEMPLATE = "This is a photo of {}."

#: A small prompt ensemble for digits (each ``{}`` is a class name).
DEFAULT_TEMPLATES = ["a {} digit", "the digit {}", "the number {}", "a drawing of the number {}", "{}"]

#: Zero-shot prompts of the attributes of ``digits-captions`` (each ``{}`` is a value name of the column).
DEFAULT_ATTRIBUTE_TEMPLATES = {"size": "a {} digit", "position": "a digit on the {}",
                               "thickness": "a digit drawn with {} strokes"}

#: Config fields of the vision towers by model type, over which ``vision_options`` go: a 4-layer ViT of
#: 4x4 patches, or a 3-stage ConvNeXt (2x2 stem), for 32x32 digits.
DEFAULT_VISION_OPTIONS: dict[str, dict[str, Any]] = {
    "vit": {"patch_size": 4, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "intermediate_size": 512},
    "convnext": {"num_stages": 3, "hidden_sizes": [32, 64, 128], "depths": [2, 2, 2], "patch_size": 2},
}


def _check_template(template: Any, key: str) -> None:
    if not isinstance(template, str):
        raise ConfigError(f"{key} must be a string with one '{{}}' for the name, got {template!r}")
    try:
        filled = template.format("\x00")
    except (IndexError, KeyError, ValueError):
        filled = None
    if filled is None or filled.count("\x00") != 1:
        raise ConfigError(f"{key} {template!r} must hold exactly one '{{}}' (where the name goes) and no other "
                          "braces")


@dataclass
class ContrastiveOptions(ImageColumns):
    text_column: str = "text"
    text_encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    """The pretrained text tower: a folder or Hub name of a transformers encoder with a pooler (BERT-like);
    the packaged MiniLM loads offline."""
    text_options: dict[str, Any] = field(default_factory=dict)
    """Overrides of the text tower's config (``hidden_dropout_prob: 0.0`` ...); keys must exist in it."""
    max_length: int = bounded(32, ">=1")
    """Tokens of a caption the text tower reads (longer ones are truncated); the saved tokenizer's limit."""
    vision_model: str = "vit"
    """A transformers vision model type whose bare model returns a (B, hidden) ``pooler_output``."""
    vision_options: dict[str, Any] = field(default_factory=dict)
    """Its config fields over :data:`DEFAULT_VISION_OPTIONS` (``image_size``/``num_channels`` come from the data)."""
    projection_dim: int = bounded(128, ">=1")
    logit_scale_init: float = INIT_LOGIT_SCALE
    """The LOG logit scale at the start, in [0, ln 100] (CLIP: ln(1 / 0.07))."""
    random_shift: int = bounded(0, ">=0")
    """Translate each training image by up to this many pixels in x and y (edge padding); keep it below what
    would change a caption (digits-captions' left/right and small/large survive 2 px). Drawn per process, so
    a run with it is not split-invariant across processes. On digits-captions (fixed positions) 2 px slowed
    learning a lot (the ViT collapsed; the shift itself is exact, edge-replicated, no fill value); 1 px is
    what keeps contrastive-digits' ConvNeXt from overfitting."""
    caption_variants: int = bounded(1, ">=1")
    """Captions per train example to pick from at random each step (caption augmentation; see the module
    docstring); 1: the dataset's own caption only. Needs ``label`` and the caption-attribute columns."""
    mean: float = 0.5
    std: float = bounded(0.5, ">0")
    """Pixels / 255 are normalised to (x - mean) / std on each of the 3 channels (saved in the image processor)."""
    class_names: list[str] | None = None
    """The zero-shot names of the label column's classes, in label order; None: the dataset's label names."""
    zero_shot_templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    """The prompt ensemble of ``zero_shot_accuracy``: templates with one ``{}`` for the class name."""
    attribute_templates: dict[str, str] | None = None
    """Column -> prompt template for zero-shot attribute accuracy (the column's value names fill ``{}``).
    None: those of :data:`DEFAULT_ATTRIBUTE_TEMPLATES` the dataset has; ``{}``: none."""
    knn_k: int = bounded(20, ">=1")
    knn_temperature: float = bounded(0.07, ">0")
    few_labels: int = bounded(10, ">=1")
    """Labelled train images per class in the few-labels k-NN / probe evaluation."""
    eval_batch_size: int = bounded(256, ">=1")

    def __post_init__(self):
        if not isinstance(self.logit_scale_init, (int, float)) or isinstance(self.logit_scale_init, bool) or not (
                math.isfinite(self.logit_scale_init) and 0 <= self.logit_scale_init <= MAX_LOGIT_SCALE):
            raise ConfigError(f"task_options.logit_scale_init must be a number in [0, ln 100 = {MAX_LOGIT_SCALE:.4f}] "
                              f"(CLIP: ln(1/0.07) = {INIT_LOGIT_SCALE:.4f}), got {self.logit_scale_init!r}")
        if not isinstance(self.caption_variants, int) or isinstance(self.caption_variants, bool) or \
                self.caption_variants < 1:
            raise ConfigError(f"task_options.caption_variants must be an integer >= 1 (1: no caption augmentation), "
                              f"got {self.caption_variants!r}")
        if not math.isfinite(self.mean):
            raise ConfigError(f"task_options.mean must be a finite number, got {self.mean!r}")
        if not isinstance(self.zero_shot_templates, list) or not self.zero_shot_templates:
            raise ConfigError(f"task_options.zero_shot_templates must be a non-empty list of templates, got "
                              f"{self.zero_shot_templates!r}")
        for i, template in enumerate(self.zero_shot_templates):
            _check_template(template, f"task_options.zero_shot_templates[{i}]")
        if self.class_names is not None and (not isinstance(self.class_names, list) or not self.class_names or not all(
                isinstance(n, str) and n.strip() for n in self.class_names) or len(set(self.class_names)) != len(
                self.class_names)):
            raise ConfigError(f"task_options.class_names must be a list of distinct non-empty strings (one per class) "
                              f"or null, got {self.class_names!r}")
        for column, template in (self.attribute_templates or {}).items():
            _check_template(template, f"task_options.attribute_templates.{column}")
        for key in ("vision_options", "text_options"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"task_options.{key} must be a mapping of config fields, got {getattr(self, key)!r}")


# ------------------------------------------------------------------------------------------------ the model
@functools.lru_cache(maxsize=1)
def _dual_encoder_class():
    from transformers import VisionTextDualEncoderModel

    class DualEncoderForContrastiveTraining(VisionTextDualEncoderModel):
        """A ``VisionTextDualEncoderModel`` (same modules, same weights) whose ``forward`` returns what CLIP's
        loss needs, ``(image_embeds (B, P), text_embeds (B, P), logit_scale)`` with both embeddings
        L2-normalised, and can start the text side from cached final CLS states ``text_cls`` (B, H) of a locked
        text encoder (then only the pooler and the projection run). Training only: the artifact is saved as the
        stock class."""

        def forward(self, pixel_values, input_ids=None, attention_mask=None, text_cls=None):
            image = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
            if text_cls is not None:
                pooled = self.text_model.pooler(text_cls[:, None, :])
            else:
                pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            text = self.text_projection(pooled)
            return F.normalize(image, dim=-1), F.normalize(text, dim=-1), self.logit_scale

    return DualEncoderForContrastiveTraining


@torch.no_grad()
def image_embeddings(model, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised projected image embeddings (N, P) of ``pixel_values`` (N, 3, S, S), as
    ``VisionTextDualEncoderModel.forward`` computes ``image_embeds``."""
    device = model.logit_scale.device
    out = [model.visual_projection(model.vision_model(pixel_values=pixel_values[i:i + batch_size].to(device))
                                   .pooler_output) for i in range(0, len(pixel_values), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1).cpu()


@torch.no_grad()
def text_embeddings(model, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised projected text embeddings (N, P) of ``texts``, tokenised as
    ``pipeline("zero-shot-image-classification")`` does (``padding=True``; truncated at the tokenizer's limit,
    which prompts shorter than ``max_length`` never reach)."""
    device = model.logit_scale.device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt").to(device)
        pooled = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                  token_type_ids=enc.get("token_type_ids")).pooler_output
        out.append(model.text_projection(pooled))
    return F.normalize(torch.cat(out).float(), dim=-1).cpu()


def zero_shot_predictions(model, tokenizer, pixel_values: torch.Tensor, class_names: list[str],
                          template: str = PIPELINE_TEMPLATE) -> torch.Tensor:
    """The (N,) class indices that ``pipeline("zero-shot-image-classification", ...)(image, candidate_labels=
    class_names, hypothesis_template=template)`` ranks first for each image of ``pixel_values``."""
    texts = text_embeddings(model, tokenizer, [template.format(name) for name in class_names])
    return (image_embeddings(model, pixel_values) @ texts.T).argmax(1)


# ------------------------------------------------------------------------------------------------- the data
class CaptionedImages(torch.utils.data.Dataset):
    """Image-caption pairs, preprocessed once: ``pixel_values`` (3, S, S) as the saved image processor makes
    them, ``input_ids`` / ``attention_mask`` (L,) padded to ``max_length``, ``labels``, each attribute column,
    and (once :attr:`text_cls` is set: a locked text encoder) the caption's cached final CLS state."""

    def __init__(self, rows, image_processor, tokenizer, task_options: ContrastiveOptions, attributes: list[str]):
        opts = task_options
        self.texts = [str(t) for t in rows[opts.text_column]]
        images = rows[opts.image_column]
        self.pixel_values = torch.cat([image_processor(images=images[i:i + 256], return_tensors="pt")["pixel_values"]
                                       for i in range(0, len(images), 256)]).float()
        enc = tokenizer(self.texts, padding="max_length", max_length=opts.max_length, truncation=True,
                        return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]
        self.labels = torch.as_tensor(np.asarray(rows[opts.label_column], dtype=np.int64))
        self.attributes = {c: torch.as_tensor(np.asarray(rows[c], dtype=np.int64)) for c in attributes}
        self.text_cls: torch.Tensor | None = None
        self.variants: list[list[str]] | None = None

    def set_variants(self, variants: list[list[str]], tokenizer, max_length: int) -> None:
        """Train on ``variants`` (N lists of V captions): ``input_ids`` / ``attention_mask`` become (N, V, L)
        (and the cache, once set, (N, V, H)); :meth:`ContrastiveTask.loss` picks one of V per example."""
        count = len(variants[0])
        enc = tokenizer([t for row in variants for t in row], padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="pt")
        self.variants = variants
        self.input_ids = enc["input_ids"].view(len(variants), count, -1)
        self.attention_mask = enc["attention_mask"].view(len(variants), count, -1)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"pixel_values": self.pixel_values[index], "input_ids": self.input_ids[index],
                "attention_mask": self.attention_mask[index], "labels": self.labels[index],
                **{c: v[index] for c, v in self.attributes.items()}}
        if self.text_cls is not None:
            item["text_cls"] = self.text_cls[index]
        return item


def load_text_tower(name: str, max_length: int, overrides: dict[str, Any]):
    """``(text model, tokenizer)`` of ``name`` (packaged checkpoints resolve offline) with ``overrides`` on its
    config; the tokenizer limited to ``max_length``. A ConfigError naming ``task_options.text_encoder`` (or the
    override) when it cannot be loaded or is not a text encoder with a pooler."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from hfx.models import resolve_pretrained

    try:
        path = resolve_pretrained(name)
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"task_options.text_encoder {name!r} cannot be loaded: {first}") from None
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"task_options.text_options.{key}: the {config.model_type} config of {name!r} has no "
                              "such field")
        setattr(config, key, value)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ConfigError(f"task_options.max_length={max_length} exceeds what {name!r} reads ({positions} positions)")
    try:
        model = AutoModel.from_pretrained(path, config=config)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"task_options.text_encoder {name!r} cannot be loaded: {str(err).splitlines()[0]}") from None
    if getattr(config, "hidden_size", None) is None or getattr(model, "pooler", None) is None:
        raise ConfigError(f"task_options.text_encoder {name!r} is not a text encoder with a pooler (a BERT-like "
                          "model whose pooler_output the dual encoder reads)")
    tokenizer.model_max_length = max_length
    return model, tokenizer


@register_task("contrastive")
class ContrastiveTask(Task):
    Options = ContrastiveOptions
    hub_task_type = "zero-shot-image-classification"

    def build_data(self) -> TaskData:
        from transformers import ViTImageProcessor

        opts, cfg = self.options, self.config.data
        self._check_vision_model()
        dataset = self.load_dataset()
        train = dataset[cfg.train_split]
        for column, key in ((opts.image_column, "image_column"), (opts.label_column, "label_column"),
                            (opts.text_column, "text_column")):
            if column not in train.column_names:
                raise ConfigError(f"dataset {cfg.dataset!r} has no column {column!r} (columns: "
                                  f"{', '.join(train.column_names)}); set task_options.{key}")
        feature = train.features[opts.label_column]
        label_names = list(feature.names) if hasattr(feature, "names") else [
            str(v) for v in sorted(set(train[opts.label_column]))]
        if opts.class_names is not None and len(opts.class_names) != len(label_names):
            raise ConfigError(f"task_options.class_names has {len(opts.class_names)} names; the label column "
                              f"{opts.label_column!r} has {len(label_names)} classes ({', '.join(label_names)})")
        self.label_names, self.class_names = label_names, list(opts.class_names or label_names)
        self.attribute_prompts = self._attribute_prompts(train)
        first = train[0][opts.image_column]
        self.size = opts.image_size or first.size[0]
        self.source_mode = first.mode
        self.image_processor = ViTImageProcessor(
            do_convert_rgb=True, do_resize=True, size={"height": self.size, "width": self.size}, do_rescale=True,
            rescale_factor=1 / 255, do_normalize=True, image_mean=[opts.mean] * 3, image_std=[opts.std] * 3)
        self.text_model, self.tokenizer = load_text_tower(opts.text_encoder, opts.max_length, opts.text_options)
        splits = {"train": train, "eval": dataset[cfg.eval_split] if cfg.eval_split is not None else None}
        self.datasets = {name: CaptionedImages(rows, self.image_processor, self.tokenizer, opts, list(self.attribute_prompts))
                         for name, rows in splits.items() if rows is not None}
        if opts.caption_variants > 1:
            self.datasets["train"].set_variants(self._caption_variants(train), self.tokenizer, opts.max_length)
        return TaskData(train=self.datasets["train"], eval=self.datasets.get("eval"))

    def _caption_variants(self, train) -> list[list[str]]:
        """``caption_variants`` captions per train example (the first its own), see the module docstring."""
        from hfx.data.builtin import CAPTION_ATTRIBUTES, CAPTION_PHRASES, CAPTION_TEMPLATES, caption_for

        opts = self.options
        needed = [opts.label_column, *CAPTION_ATTRIBUTES]
        missing = [c for c in needed if c not in train.column_names]
        if missing:
            raise ConfigError(f"task_options.caption_variants={opts.caption_variants} writes captions from the columns "
                              f"{', '.join(needed)}; dataset {self.config.data.dataset!r} lacks {', '.join(missing)} "
                              "(set caption_variants: 1)")
        columns = {c: train[c] for c in needed}
        counts = [len(CAPTION_TEMPLATES)] + [len(next(iter(CAPTION_PHRASES[a].values()))) for a in CAPTION_ATTRIBUTES]
        combos = int(np.prod(counts))  # template x one phrasing per attribute
        rng = np.random.default_rng([int(self.config.seed), 0xCA97])
        own_texts = self.datasets["train"].texts
        variants = []
        for i, own in enumerate(own_texts):
            label = int(columns[opts.label_column][i])
            attributes = {a: int(columns[a][i]) for a in CAPTION_ATTRIBUTES}
            row, seen = [own], {own}
            for combo in rng.permutation(combos):
                if len(row) == opts.caption_variants:
                    break
                digits = np.unravel_index(int(combo), counts)
                text = caption_for(label, attributes, int(digits[0]),
                                   {a: int(d) for a, d in zip(CAPTION_ATTRIBUTES, digits[1:])})
                if text not in seen:
                    row.append(text)
                    seen.add(text)
            while len(row) < opts.caption_variants:  # more variants than distinct captions: repeat them
                row.append(row[len(row) % len(seen)])
            variants.append(row)
        return variants

    def _attribute_prompts(self, train) -> dict[str, list[str]]:
        """Column -> one prompt per value name, for the zero-shot attribute accuracies."""
        opts = self.options
        explicit = opts.attribute_templates is not None
        templates = opts.attribute_templates if explicit else DEFAULT_ATTRIBUTE_TEMPLATES
        prompts = {}
        for column, template in templates.items():
            feature = train.features.get(column)
            if feature is None or not hasattr(feature, "names"):
                if explicit:
                    raise ConfigError(f"task_options.attribute_templates.{column}: the dataset has no class-label column "
                                      f"{column!r} (columns: {', '.join(train.column_names)})")
                continue
            prompts[column] = [template.format(name) for name in feature.names]
        return prompts

    def _check_vision_model(self) -> None:
        """``vision_model`` / ``vision_options`` name a transformers vision config and its fields (checked before
        any data or weights are loaded)."""
        from transformers import AutoConfig

        opts = self.options
        try:
            base = AutoConfig.for_model(opts.vision_model)
        except ValueError:
            raise ConfigError(f"task_options.vision_model {opts.vision_model!r} is not a transformers model type "
                              f"(e.g. {', '.join(DEFAULT_VISION_OPTIONS)})") from None
        if not (hasattr(base, "image_size") and hasattr(base, "num_channels")):
            raise ConfigError(f"task_options.vision_model {opts.vision_model!r} is not a vision model with "
                              "image_size and num_channels")
        for key in opts.vision_options:
            if not hasattr(base, key):
                raise ConfigError(f"task_options.vision_options.{key}: the {opts.vision_model} config has no such field")

    def build_models(self) -> dict[str, torch.nn.Module]:
        from transformers import AutoConfig, AutoModel, VisionTextDualEncoderConfig

        opts = self.options
        defaults = DEFAULT_VISION_OPTIONS.get(opts.vision_model, {})
        try:
            vision_config = AutoConfig.for_model(opts.vision_model, **{**defaults, **opts.vision_options,
                                                                       "image_size": self.size, "num_channels": 3})
            if getattr(vision_config, "hidden_size", None) is None and getattr(vision_config, "hidden_sizes", None):
                # ConvNeXt-like: the dual encoder reads vision_config.hidden_size (the projection's input), which
                # these configs lack; the pooled width is the last stage's (saved in config.json, reloads as is)
                vision_config.hidden_size = int(vision_config.hidden_sizes[-1])
            vision = AutoModel.from_config(vision_config)
            with torch.no_grad():  # in eval mode: no dropout draws from the global RNG
                pooled = vision.eval()(pixel_values=torch.zeros(2, 3, self.size, self.size)).pooler_output
            vision.train()
        except Exception as err:  # a config a model cannot be built from, or a model that is no vision encoder
            raise ConfigError(f"task_options.vision_model {opts.vision_model!r} with vision_options "
                              f"{opts.vision_options}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                              ) from None
        if pooled is None or tuple(pooled.shape) != (2, vision_config.hidden_size):
            raise ConfigError(f"task_options.vision_model {opts.vision_model!r} gives no (batch, hidden_size) "
                              "pooler_output for the dual encoder to project")
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vision_config, self.text_model.config, projection_dim=opts.projection_dim,
            logit_scale_init_value=float(opts.logit_scale_init))
        model = _dual_encoder_class()(config=config, vision_model=vision, text_model=self.text_model)
        del self.text_model  # it lives in the model now
        self.locked_text = self._text_encoder_locked(model)
        if self.locked_text:
            self._cache_text_states(model)
        return {"model": model}

    def _text_encoder_locked(self, model) -> bool:
        """Whether ``freeze:`` keeps every text-tower parameter before the pooler frozen for the whole run (the
        rule of :class:`hfx.trainers.freeze.FreezeRun`: a parameter trains when a ``train_only`` pattern
        matches ``model.<name>``)."""
        freeze = self.config.freeze
        if not freeze.train_only or freeze.unfreeze_at_step is not None or self.config.peft is not None:
            return False
        patterns = [re.compile(p) for p in freeze.train_only]
        return not any(any(p.search(f"model.text_model.{n}") for p in patterns)
                       for n, _ in model.text_model.named_parameters() if not n.startswith("pooler."))

    @torch.no_grad()
    def _cache_text_states(self, model, batch_size: int = 128) -> None:
        """The final CLS states of every caption under the locked encoder (eval mode: no dropout)."""
        encoder = model.text_model
        was_training = encoder.training
        encoder.eval()
        for dataset in self.datasets.values():
            input_ids, attention_mask = dataset.input_ids, dataset.attention_mask
            shape = input_ids.shape[:-1]  # (N,) or (N, V) with caption variants
            input_ids, attention_mask = input_ids.reshape(-1, input_ids.shape[-1]), attention_mask.reshape(
                -1, attention_mask.shape[-1])
            states = []
            for i in range(0, len(input_ids), batch_size):
                out = encoder(input_ids=input_ids[i:i + batch_size], attention_mask=attention_mask[i:i + batch_size])
                states.append(out.last_hidden_state[:, 0])
            dataset.text_cls = torch.cat(states).view(*shape, -1)
        encoder.train(was_training)

    # ------------------------------------------------------------------------------------------ the loss
    def loss(self, models, batch, state):
        model = models["model"]
        pixels = random_shift(batch["pixel_values"], self.options.random_shift)
        input_ids, attention_mask, text_cls = batch["input_ids"], batch["attention_mask"], batch.get("text_cls")
        if input_ids.dim() == 3:  # caption variants (B, V, L): one per example, from the global RNG
            pick = torch.randint(input_ids.shape[1], (input_ids.shape[0],)).to(input_ids.device)
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            input_ids, attention_mask = input_ids[rows, pick], attention_mask[rows, pick]
            text_cls = text_cls[rows, pick] if text_cls is not None else None
        if self.locked_text:
            image, text, logit_scale = model(pixels, text_cls=text_cls)
        else:
            length = int(attention_mask.sum(1).max())  # drop columns that are padding in every row
            image, text, logit_scale = model(pixels, input_ids=input_ids[:, :length],
                                             attention_mask=attention_mask[:, :length])
        loss = clip_loss(image, text, logit_scale)
        return loss, {"logit_scale": logit_scale.detach().clamp(0, MAX_LOGIT_SCALE).exp()}

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        from hfx.metrics.representation import zero_shot_accuracy
        from hfx.trainers.tasks._ssl import representation_metrics

        model = self.accelerator.unwrap_model(models["model"])
        data = self.datasets["eval"]
        images = image_embeddings(model, data.pixel_values, self.options.eval_batch_size)
        prompts = [t.format(name) for name in self.class_names for t in self.options.zero_shot_templates]
        ensemble = text_embeddings(model, self.tokenizer, prompts).view(len(self.class_names),
                                                                        len(self.options.zero_shot_templates), -1)
        single = text_embeddings(model, self.tokenizer, [PIPELINE_TEMPLATE.format(n) for n in self.class_names])
        metrics = {"zero_shot_accuracy": zero_shot_accuracy(images, data.labels, ensemble),
                   "zero_shot_accuracy_single": zero_shot_accuracy(images, data.labels, single)}
        for column, texts in self.attribute_prompts.items():
            metrics[f"zero_shot_{column}_accuracy"] = zero_shot_accuracy(
                images, data.attributes[column], text_embeddings(model, self.tokenizer, texts))
        captions = text_embeddings(model, self.tokenizer, data.texts)
        similarity = images @ captions.T
        same = torch.tensor([[a == b for b in data.texts] for a in data.texts])  # same caption text counts as a hit
        rows = torch.arange(len(data))
        metrics["image_to_text_recall@1"] = float(same[rows, similarity.argmax(1)].double().mean())
        metrics["text_to_image_recall@1"] = float(same[similarity.argmax(0), rows].double().mean())
        metrics["logit_scale"] = float(model.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp())

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)

        metrics.update(representation_metrics(self, encode, self.datasets["train"], data))
        return metrics

    # ------------------------------------------------------------------------------------------ the artifact
    def save(self, models, state_dicts, output_dir: Path) -> None:
        import copy

        from transformers import VisionTextDualEncoderModel

        stock = VisionTextDualEncoderModel(copy.deepcopy(models["model"].config))
        stock.load_state_dict(state_dicts["model"])
        stock.config.architectures = ["VisionTextDualEncoderModel"]
        stock.eval().save_pretrained(output_dir)
        self.save_preprocessing(output_dir)

    def save_preprocessing(self, output_dir: Path) -> None:
        from transformers import VisionTextDualEncoderProcessor

        opts = self.options
        VisionTextDualEncoderProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer
                                       ).save_pretrained(output_dir)
        preprocessing = {"image_size": self.size, "source_mode": self.source_mode, "mode": "RGB",
                         "mean": [opts.mean] * 3, "std": [opts.std] * 3, "scale": "pixel / 255",
                         "labels": self.label_names, "text_max_length": opts.max_length,
                         "text_pooling": "the text tower's BERT pooler: tanh(dense(h_CLS))"}
        (output_dir / "hfx_preprocessing.json").write_text(json.dumps(preprocessing, indent=2))
        zero_shot = {"class_names": self.class_names, "templates": list(opts.zero_shot_templates),
                     "pipeline_template": PIPELINE_TEMPLATE, "attribute_prompts": self.attribute_prompts,
                     "ensemble": "normalise each prompt's text_embeds, average per class, normalise again"}
        (output_dir / "zero_shot.json").write_text(json.dumps(zero_shot, indent=2))

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        opts = self.options
        text = "locked (LiT-style: only its pooler and projection train)" if self.locked_text else "tuned"
        summary = (f"A CLIP-style `VisionTextDualEncoderModel`: a {opts.vision_model} vision tower trained from scratch "
                   f"on {self.size}x{self.size} images (converted to RGB) and the pretrained `{opts.text_encoder}` text "
                   f"tower, {text}, projected to {opts.projection_dim} dimensions and trained with CLIP's symmetric "
                   "InfoNCE loss on image-caption pairs. It serves `pipeline(\"zero-shot-image-classification\")` as "
                   f"it is; class names {', '.join(self.class_names)}; zero_shot.json holds the prompt ensemble "
                   "behind `zero_shot_accuracy` (`zero_shot_accuracy_single` is the pipeline's default template).")
        return {"summary": summary}
