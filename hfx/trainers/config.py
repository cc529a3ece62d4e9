"""Training configuration: plain dataclasses, read from YAML and checked key by key.

A recipe is one YAML mapping::

    task: image-classification        # a registered task (hfx.trainers.tasks)
    output_dir: outputs/classify-digits
    data: {dataset: digits, options: {image_size: 16}}
    task_options: {model: timm/resnet10t, label_smoothing: 0.1}   # the task's own dataclass
    train: {max_steps: 600, batch_size: 64}
    optimizer: {name: adamw, lr: 3e-3}
    scheduler: {name: cosine, warmup_steps: 30}
    ...

This module is a leaf: it knows the sections and their fields, nothing of tasks, callbacks or peft, and it
changes nothing it checks. :func:`from_dict` builds a dataclass from a mapping: an unknown key is an error
that names it and the closest valid key; a value of the wrong type, a NaN or infinite number, or a number
outside the range a field declares (:func:`bounded`) is an error that names the key, what is allowed and
the value. The checks that need the registries (the task's options, the scheduler's name, peft) are
:mod:`hfx.trainers.recipe`'s, which also reads the files.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from hfx.trainers.errors import ConfigError

_BOUNDS = {">0": (0, False, None, None), ">=0": (0, True, None, None), ">=1": (1, True, None, None),
           "[0,1]": (0, True, 1, True), "[0,1)": (0, True, 1, False), "(0,1]": (0, False, 1, True)}


def bounded(default: Any, bounds: str, hint: str = "") -> Any:
    """A dataclass field whose value (when not None) must lie in ``bounds``: ``">0"``, ``">=0"``, ``">=1"``,
    ``"[0,1]"``, ``"[0,1)"`` or ``"(0,1]"``. ``hint`` ends the error message (how to switch a feature off)."""
    if bounds not in _BOUNDS:
        raise ValueError(f"unknown bounds {bounds!r}; use one of {', '.join(_BOUNDS)}")
    return field(default=default, metadata={"bounds": bounds, "hint": hint})


def check_bounds(value: Any, bounds: str, key: str, hint: str = "") -> None:
    """Raise :class:`ConfigError` naming ``key`` when ``value`` (a number or a tuple of them) is outside ``bounds``."""
    if value is None:
        return
    for item in value if isinstance(value, (tuple, list)) else [value]:
        low, low_closed, high, high_closed = _BOUNDS[bounds]
        ok = (item >= low if low_closed else item > low) and (
            high is None or (item <= high if high_closed else item < high))
        if not ok:
            allowed = bounds.replace(",", ", ") if bounds.startswith(("[", "(")) else bounds
            what = f"in {allowed}" if bounds.startswith(("[", "(")) else allowed.replace(">=", ">= ").replace(">0", "> 0")
            raise ConfigError(f"config key {key!r} must be {what}, got {value!r}{'; ' + hint if hint else ''}")


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Where the examples come from; the task decides how to turn them into batches."""

    dataset: str | None = None
    """A built-in name (``digits``, ``stdlib-text``), a local folder or file, or a Hub dataset name
    (anything :func:`hfx.data.load` accepts)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :func:`hfx.data.load` (for built-ins: of the dataset's builder)."""
    train_split: str = "train"
    eval_split: str | None = "test"
    max_train_samples: int | None = bounded(None, ">=1", "null uses every example")
    max_eval_samples: int | None = bounded(None, ">=1", "null uses every example")
    num_workers: int = bounded(0, ">=0")


@dataclass
class TrainLoopConfig:
    """How long to train and how one optimizer step is made."""

    max_steps: int | None = bounded(None, ">=1")
    """Optimizer steps in total. When unset, ``epochs`` decides."""
    epochs: float | None = bounded(None, ">0")
    batch_size: int = bounded(32, ">=1")
    """Examples per process per micro-batch; the global batch is batch_size x processes x accumulation."""
    eval_batch_size: int | None = bounded(None, ">=1", "null uses train.batch_size")
    gradient_accumulation_steps: int = bounded(1, ">=1")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """None: what ``accelerate launch`` / ``accelerate config`` says (``no`` without either)."""
    max_grad_norm: float | None = bounded(1.0, ">0", "null turns gradient clipping off")
    nan_policy: Literal["stop", "skip"] = "stop"
    """What a non-finite loss does: stop the run with an error, or skip that optimizer step."""


@dataclass
class OptimizerConfig:
    """One optimizer over the trainable parameters; biases and norm weights (tensors of rank < 2) get no
    weight decay."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = bounded(1e-3, ">0")
    weight_decay: float = bounded(0.0, ">=0")
    betas: tuple[float, float] = bounded((0.9, 0.999), "[0,1)")
    eps: float = bounded(1e-8, ">0")
    momentum: float = bounded(0.9, "[0,1)")
    """SGD only."""


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, stepped once per optimizer step (``reduce_lr_on_plateau``: once per evaluation).

    ``name`` is a transformers ``SchedulerType`` (``constant``, ``constant_with_warmup``, ``linear``, ``cosine``,
    ``cosine_with_min_lr``, ``cosine_with_restarts``, ``polynomial``, ``inverse_sqrt``, ``warmup_stable_decay``,
    ``reduce_lr_on_plateau``), built by ``transformers.get_scheduler`` exactly as ``TrainingArguments`` would, or
    a schedule registered with :func:`hfx.trainers.register_schedule` (``relora_jagged``)."""

    name: str = "constant"
    warmup_steps: int = bounded(0, ">=0")
    """Linear warm-up from 0 over this many optimizer steps (transformers' ``num_warmup_steps``)."""
    min_lr_ratio: float = bounded(0.0, "[0,1]")
    """Floor as a fraction of the peak learning rate, for the schedules that have one (``cosine_with_min_lr``
    and ``cosine``, which becomes ``cosine_with_min_lr`` when the floor is above 0; ``reduce_lr_on_plateau``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the schedule (transformers' ``lr_scheduler_kwargs``: ``num_cycles``,
    ``power``, ``factor``, ``patience``, ...)."""


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (of every model the task lists in ``ema_models``)."""

    enabled: bool = False
    decay: float = bounded(0.999, "[0,1]")
    warmup: bool = True
    """Use ``min(decay, (1 + n) / (10 + n))`` after n updates, so early averages are not dominated by
    the random initialisation (as diffusers' EMAModel)."""
    update_every: int = bounded(1, ">=1")
    use_for_eval: bool = True
    use_for_final: bool = True


@dataclass
class EvalConfig:
    every_steps: int | None = bounded(None, ">=1", "null evaluates only at the end")
    at_start: bool = False
    """Evaluate once before the first step (logged at step 0): the baseline a fine-tuning run starts from."""
    at_end: bool = True
    metric: str | None = None
    """The metric that early stopping and ``scheduler.name=reduce_lr_on_plateau`` watch (a key of the task's
    evaluation, e.g. ``accuracy`` or ``perplexity``)."""
    mode: Literal["min", "max"] = "min"
    early_stopping_patience: int | None = bounded(None, ">=1", "null turns early stopping off")
    """Stop after this many evaluations without an improvement of more than ``min_delta``."""
    min_delta: float = bounded(0.0, ">=0")


@dataclass
class CheckpointConfig:
    every_steps: int | None = bounded(None, ">=1", "null saves no periodic checkpoint")
    total_limit: int | None = bounded(None, ">=1", "null keeps every checkpoint")
    """Keep only the newest N complete ``checkpoint-<step>`` folders."""
    on_signal: bool = True
    """Save a checkpoint, then exit, on SIGTERM / SIGINT."""


@dataclass
class LogConfig:
    every_steps: int = bounded(10, ">=1")
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers accelerate supports (``tensorboard``, ``wandb``, ``mlflow``, ...); ``[]`` for none."""
    project_name: str = "hfx"


@dataclass
class FreezeConfig:
    """Fine-tuning schedules: train only some parameters first, optionally everything after N steps."""

    train_only: list[str] = field(default_factory=list)
    """Regular expressions (``re.search``) over ``<model name>.<parameter name>`` (``model.head.weight``); the
    trainable parameters that match none are frozen. Empty: nothing is frozen."""
    unfreeze_at_step: int | None = bounded(None, ">=1", "null never unfreezes")
    """After this many optimizer steps the frozen parameters train too (one process only); None: never."""


@dataclass
class TrainConfig:
    """A whole run. ``task`` picks the task; ``task_options`` is that task's own options dataclass."""

    task: str
    output_dir: str = "outputs/run"
    seed: int = bounded(0, ">=0")
    resume_from_checkpoint: str | None = None
    """``latest`` (the newest complete checkpoint in ``output_dir``, or a fresh start when the folder holds
    no run) or the path of a ``checkpoint-<step>`` folder."""
    overwrite_output_dir: bool = False
    """Start over in an ``output_dir`` that holds a previous hfx run (the files that run wrote are deleted,
    nothing else). Without it, such a run is refused unless it resumes."""
    allow_config_change: bool = False
    """Resume although the config differs from the checkpoint's in a key that changes the training (the
    learning rate, the batch size, ...): the resumed run is then not the uninterrupted one, and the changed
    keys are recorded in ``results.json``. Without it such a resume is refused."""
    data: DataConfig = field(default_factory=DataConfig)
    task_options: Any = None
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-optimizer overrides of ``optimizer`` for tasks with several (e.g. ``{discriminator: {lr: 4e-4}}``)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    """Registered callbacks by name with their options: ``[{name: my-callback, every: 100}]``."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    peft: dict[str, Any] | None = None
    """Parameter-efficient fine-tuning of one task model: ``{method: lora|relora|prefix_tuning|..., model:
    <name>, save_base: true, <fields of the method's peft config>}`` (see :mod:`hfx.trainers.peft`)."""
    push_to_hub: str | None = None
    """A Hub repo id (``user/name``): ``hfx train`` pushes the final artifact, its card and images there
    at the end of the run (never checkpoints or logs); see :func:`hfx.hub.push`."""
    recipe: str | None = None
    """Where the recipe came from (filled in by :func:`hfx.trainers.load_config`)."""


#: Keys a resume may change without changing what the run computes (checked against the checkpoint's
#: config by the engine; any other difference needs ``allow_config_change``). Prefixes end with a dot.
RESUME_SAFE_KEYS = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "allow_config_change", "recipe",
                    "push_to_hub", "log.", "checkpoint.", "eval.at_start", "eval.at_end")


# ---------------------------------------------------------------------------------------------- parsing
def from_dict(cls: type, data: Any, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, checking every key and value.

    Raises:
        ConfigError: ``data`` is not a mapping, holds a key ``cls`` lacks (the message suggests the
            closest field), misses a required field, or holds a value of the wrong type or out of range.
    """
    where = prefix.rstrip(".") or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{_suggest(str(key), fields, prefix)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = coerce(data[name], hints[name], prefix + name)
            if "bounds" in f.metadata:
                check_bounds(values[name], f.metadata["bounds"], prefix + name, f.metadata.get("hint", ""))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {prefix + name!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # a dataclass's own __post_init__ check
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None


def _suggest(key: str, valid, prefix: str, what: str = "valid keys") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    return f"; {what}: {', '.join(prefix + name for name in valid)}"


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type (``"3e-4"`` for a float,
    a list for a tuple). Raises :class:`ConfigError` naming ``key`` when it does not fit; a float must be
    finite (NaN and infinity are refused everywhere)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(_wrong(key, tp, value))
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key {key!r} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is list:
                return [coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if not args or len(args) == len(value):
                return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    elif origin is dict:
        if isinstance(value, dict):
            value_type = args[1] if args else Any
            return {str(k): coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    else:
        raise TypeError(f"config field {key!r} has an annotation the loader does not handle: {tp!r}")
    raise ConfigError(_wrong(key, tp, value))


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}.get(
            tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _wrong(key: str, tp: Any, value: Any) -> str:
    return f"config key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Split ``["train.max_steps=20", "optimizer.lr=1e-3"]`` into (key path, value) pairs; each value is
    read as YAML (``20`` is an int, ``[a, b]`` a list, ``{k: v}`` a mapping, ``null`` None), then typed by
    the dataclass field when the config is built."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each override set in turn: ``a.b=1`` sets one key and keeps its siblings;
    ``a={...}`` replaces the whole mapping."""
    import copy

    out = copy.deepcopy(raw)
    for parts, value in parse_overrides(overrides):
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(parts)!r}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else in ``update`` replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def optimizer_config(config: TrainConfig, name: str) -> OptimizerConfig:
    """The ``optimizer`` section with the per-optimizer overrides of ``optimizers.<name>`` applied."""
    return from_dict(OptimizerConfig, merge(dataclasses.asdict(config.optimizer), config.optimizers.get(name, {})),
                     f"optimizers.{name}.")


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (tuples become lists)."""

    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def flat_items(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flat_items(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys (``optimizer.lr``) whose values differ between two :func:`to_dict` configs, except those of
    :data:`RESUME_SAFE_KEYS`; each as ``key: old -> new``."""
    old, new = flat_items(saved), flat_items(current)
    changed = []
    for key in sorted(set(old) | set(new)):
        if any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE_KEYS):
            continue
        if old.get(key) != new.get(key):
            changed.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changed
