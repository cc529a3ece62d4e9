"""Training configuration: dataclasses loaded from YAML, overridable with ``key.sub=value``.

A recipe is one YAML mapping::

    task: image-classification        # a registered task (hfx.trainers.tasks)
    output_dir: outputs/classify-digits
    data: {dataset: digits, options: {image_size: 16}}
    task_options: {model: timm/resnet10t, label_smoothing: 0.1}   # the task's own dataclass
    train: {max_steps: 600, batch_size: 64}
    optimizer: {name: adamw, lr: 3e-3}
    scheduler: {name: cosine, warmup_steps: 30}
    ...

Every key is checked against the dataclass fields before anything is built: an unknown key is an error
that names it and the closest valid key, a value of the wrong type is an error that names the key, the
expected type and the value. :func:`load_config` returns the validated :class:`TrainConfig`, whose
``task_options`` is already an instance of the task's own options dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe that cannot run: unknown key, wrong type, missing value. The message is one line."""


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
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    num_workers: int = 0


@dataclass
class TrainLoopConfig:
    """How long to train and how one optimizer step is made."""

    max_steps: int | None = None
    """Optimizer steps in total. When unset, ``epochs`` decides."""
    epochs: float | None = None
    batch_size: int = 32
    """Examples per process per micro-batch; the global batch is batch_size x processes x accumulation."""
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """None: what ``accelerate launch`` / ``accelerate config`` says (``no`` without either)."""
    max_grad_norm: float | None = 1.0
    nan_policy: Literal["stop", "skip"] = "stop"
    """What a non-finite loss does: stop the run with an error, or skip that optimizer step."""


@dataclass
class OptimizerConfig:
    """One optimizer over the trainable parameters; biases and norm weights (tensors of rank < 2) get no
    weight decay."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    """SGD only."""


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: a name registered with :func:`hfx.trainers.register_schedule`."""

    name: str = "constant"
    """``constant``, ``linear``, ``cosine`` (all with linear warm-up), ``plateau`` (ReduceLROnPlateau on
    ``eval.metric``), or any registered name."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    """Floor of ``linear``/``cosine`` as a fraction of the peak learning rate."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the schedule's factory (``plateau``: factor, patience, threshold)."""


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (of every model the task lists in ``ema_models``)."""

    enabled: bool = False
    decay: float = 0.999
    warmup: bool = True
    """Use ``min(decay, (1 + n) / (10 + n))`` after n updates, so early averages are not dominated by
    the random initialisation (as diffusers' EMAModel)."""
    update_every: int = 1
    use_for_eval: bool = True
    use_for_final: bool = True


@dataclass
class EvalConfig:
    every_steps: int | None = None
    at_end: bool = True
    metric: str | None = None
    """The metric that early stopping and ``scheduler.name=plateau`` watch (a key of the task's
    evaluation, e.g. ``accuracy`` or ``perplexity``)."""
    mode: Literal["min", "max"] = "min"
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without an improvement of more than ``min_delta``."""
    min_delta: float = 0.0


@dataclass
class CheckpointConfig:
    every_steps: int | None = None
    total_limit: int | None = None
    """Keep only the newest N complete ``checkpoint-<step>`` folders."""
    on_signal: bool = True
    """Save a checkpoint, then exit, on SIGTERM / SIGINT."""


@dataclass
class LogConfig:
    every_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers accelerate supports (``tensorboard``, ``wandb``, ``mlflow``, ...); ``[]`` for none."""
    project_name: str = "hfx"


@dataclass
class FreezeConfig:
    """Fine-tuning schedules: train only some parameters first, optionally everything after N steps."""

    train_only: list[str] = field(default_factory=list)
    """Regular expressions (``re.search``) over ``<model name>.<parameter name>`` (``model.head.weight``); the
    trainable parameters that match none are frozen. Empty: nothing is frozen."""
    unfreeze_at_step: int | None = None
    """After this many optimizer steps the frozen parameters train too (one process only); None: never."""


@dataclass
class TrainConfig:
    """A whole run. ``task`` picks the task; ``task_options`` is that task's own options dataclass."""

    task: str
    output_dir: str = "outputs/run"
    seed: int = 0
    resume_from_checkpoint: str | None = None
    """``latest`` (the newest complete checkpoint in ``output_dir``, or a fresh start when there is
    none) or the path of a ``checkpoint-<step>`` folder."""
    overwrite_output_dir: bool = False
    """Start over in an ``output_dir`` that holds a previous run (its checkpoints, metrics and final
    artifact are deleted). Without it, such a run is refused unless it resumes."""
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
    """Where the recipe came from (filled in by :func:`load_config`)."""


# ---------------------------------------------------------------------------------------------- parsing
def from_dict(cls: type, data: Any, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, checking every key and value.

    Raises:
        ConfigError: ``data`` is not a mapping, holds a key ``cls`` lacks (the message suggests the
            closest field), misses a required field, or holds a value of the wrong type.
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
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {prefix + name!r}")
    return cls(**values)


def _suggest(key: str, valid, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    return f"; valid keys: {', '.join(prefix + name for name in valid)}"


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type (``"3e-4"`` for a float,
    a list for a tuple). Raises :class:`ConfigError` naming ``key`` when it does not fit."""
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
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


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe (a YAML path, a shipped recipe name such as ``"classify-digits"``, or a mapping),
    apply ``overrides`` and validate all of it, the task's own options included.

    Returns:
        A :class:`TrainConfig` whose ``task_options`` is an instance of the task's ``Options`` dataclass.

    Raises:
        ConfigError: unknown key (with the closest valid key), wrong type, unknown task, missing dataset.
        FileNotFoundError: ``source`` names no file and no shipped recipe.
    """
    from hfx.trainers.tasks import get_task

    recipe = None
    if isinstance(source, dict):
        raw = source
    else:
        from hfx.resources import training_config

        path = training_config(str(source))
        recipe = str(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    if raw.get("recipe") is None:
        raw["recipe"] = recipe
    config = from_dict(TrainConfig, raw)
    task_cls = get_task(config.task)
    config.task_options = from_dict(task_cls.Options, raw.get("task_options"), "task_options.")
    validate(config, task_cls)
    return config


def validate(config: TrainConfig, task_cls: type) -> None:
    """Checks across fields, done before anything is built."""
    from hfx.trainers.callbacks import CALLBACKS
    from hfx.trainers.checkpoint import previous_run_files, resolve_checkpoint
    from hfx.trainers.peft import validate_freeze, validate_peft
    from hfx.trainers.schedules import SCHEDULES

    t = config.train
    if config.data.dataset is None and task_cls.needs_dataset:
        raise ConfigError(f"missing required config key 'data.dataset' (task {config.task!r} trains on a dataset)")
    dataset = config.data.dataset
    if dataset is not None and dataset.startswith((".", "/", "~")) and not Path(dataset).expanduser().exists():
        raise ConfigError(f"data.dataset {dataset!r} does not exist")
    if t.max_steps is None and t.epochs is None:
        raise ConfigError("set train.max_steps or train.epochs (neither is set)")
    for key, value in (("train.max_steps", t.max_steps), ("train.batch_size", t.batch_size),
                       ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                       ("log.every_steps", config.log.every_steps), ("ema.update_every", config.ema.update_every),
                       ("eval.every_steps", config.eval.every_steps),
                       ("checkpoint.every_steps", config.checkpoint.every_steps),
                       ("checkpoint.total_limit", config.checkpoint.total_limit)):
        if value is not None and value < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {value}")
    if t.epochs is not None and t.epochs <= 0:
        raise ConfigError(f"config key 'train.epochs' must be > 0, got {t.epochs}")
    if config.resume_from_checkpoint not in (None, "latest"):
        resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)  # FileNotFoundError naming it
    elif config.resume_from_checkpoint is None and not config.overwrite_output_dir:
        previous = previous_run_files(config.output_dir)
        if previous:
            raise ConfigError(f"output_dir {config.output_dir} already holds a run ({', '.join(previous)}); set "
                              "resume_from_checkpoint=latest to continue it or overwrite_output_dir=true to start over")
    validate_peft(config)  # before the scheduler check: ReLoRA sets its own schedule
    validate_freeze(config)
    if config.scheduler.name not in SCHEDULES:
        raise ConfigError(f"unknown scheduler.name {config.scheduler.name!r}"
                          f"{_suggest(config.scheduler.name, SCHEDULES, '')}".replace("valid keys", "registered schedules"))
    needs_metric = config.scheduler.name == "plateau" or config.eval.early_stopping_patience is not None
    if needs_metric and config.eval.metric is None:
        raise ConfigError("eval.metric must name the metric that scheduler 'plateau' / early stopping watch")
    for name, override in config.optimizers.items():
        for key in override:
            valid = [f.name for f in dataclasses.fields(OptimizerConfig)]
            if key not in valid:
                raise ConfigError(f"unknown config key {f'optimizers.{name}.{key}'!r}{_suggest(key, valid, f'optimizers.{name}.')}")
    for i, spec in enumerate(config.callbacks):
        if "name" not in spec:
            raise ConfigError(f"callbacks[{i}] needs a 'name' (registered: {', '.join(sorted(CALLBACKS)) or 'none'})")
        if spec["name"] not in CALLBACKS:
            raise ConfigError(f"unknown callback {spec['name']!r}{_suggest(spec['name'], CALLBACKS, '')}"
                              .replace("valid keys", "registered callbacks"))


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
