"""Model cards for hfx artifacts: Hub metadata with the measured results, and a body that says how to use
the artifact, shows its samples and training curve, and gives the exact recipe, hardware and versions.

:func:`render_card` writes ``README.md`` (plus ``images/``) into the artifact folder of a run folder or a
bare artifact folder (see :mod:`hfx.hub.artifact`), from the template ``hub_cards/<kind>.md`` for the
artifact's kind (``model``, ``pipeline``, ``adapter``). What it reads from a run folder:

- ``config.yaml``: the resolved recipe (task, dataset, seed), shown in full;
- ``results.json``: the final evaluation (``eval/<metric>``), step count and training time;
- ``metrics.jsonl``: the training-loss curve, plotted to ``images/loss.png``;
- ``samples/*.png``: the newest grid of each series; a pipeline or VAE without any gets a small grid
  sampled now (kept as ``images/samples.png`` and reused by later renders).

``images/`` belongs to the card: images in it that the card does not show are removed.

Whatever the caller knows better (hardware, the command line, sample sizes and the feature extractor
behind each metric) comes in as keyword facts; they are kept in ``.hfx-card.json`` beside the card so that
``hfx card`` and ``hfx push`` re-render the same card (push fills in the repo id for the load snippet).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from hfx.hub.artifact import Output, auto_class_name, resolve_output

logger = logging.getLogger(__name__)

FACTS_FILE = ".hfx-card.json"
#: The first line of a card hfx rendered; push re-renders such cards (for the repo id). Delete the line
#: to keep a hand-edited card as it is.
MARKER = "hfx-card: rendered by `hfx card`; delete this line to keep manual edits when pushing"

FACT_KEYS = {
    "model_name": "title of the card (default: derived from the run folder)",
    "summary": "one paragraph saying what the model is",
    "repo_id": "Hub repo id used in the load snippet (default: the local artifact path)",
    "license": "license identifier (default apache-2.0)",
    "datasets": "Hub dataset ids the model was trained on",
    "tags": "extra tags",
    "pipeline_tag": "Hub pipeline tag",
    "task_type": "Hub task type of the evaluation results (default: the pipeline tag)",
    "method": "the method's name (default: the task of the recipe)",
    "eval_results": "list of {metric, value, num_samples, extractor, dataset, split}",
    "eval_num_samples": "number of samples behind every metric of results.json",
    "eval_extractor": "feature extractor behind every metric of results.json (e.g. inception-v3 weights)",
    "sample_images": "paths of sample grid images to show",
    "sample_grid": "sample a grid now when a pipeline/VAE card has no samples (default True)",
    "command": "the command that trained the model",
    "hardware": "what it trained on",
    "train_time": "how long it trained (text), default from results.json",
    "limitations": "the limitations section",
    "remote_code": "write the snippet for loading without hfx (trust_remote_code=True)",
    "load_snippet": "Python that loads the artifact, replacing the generated one; REPO_OR_PATH becomes the repo id",
}
_PERSISTED = set(FACT_KEYS) - {"repo_id", "sample_images"}
_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img\s[^>]*src=[\"']([^\"']+)[\"']")
_STACK = ("hfx", "torch", "transformers", "diffusers", "peft", "accelerate", "huggingface_hub")
DEFAULT_LIMITATIONS = (
    "Trained for a short time on a small dataset: the numbers above hold for that data and that evaluation "
    "only. Measure the model on your own data before relying on it."
)


def card_images(markdown: str) -> list[str]:
    """Relative paths of the images a card shows (markdown ``![..](path)`` and ``<img src>``), in order."""
    paths = []
    for match in _IMAGE.finditer(markdown):
        path = match.group(1) or match.group(2)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", path, re.IGNORECASE) and path not in paths:  # skip URLs
            paths.append(path.removeprefix("./"))
    return paths


def render_card(output_dir: str | Path, *, out_dir: str | Path | None = None, **facts: Any) -> Path:
    """Render the model card of an output folder (see :mod:`hfx.hub.artifact`).

    Args:
        output_dir: a run folder (with ``final/``) or a folder written by ``save_pretrained``.
        out_dir: where to write ``README.md`` and ``images/`` (default: the artifact folder).
        **facts: see :data:`FACT_KEYS`; they override what the folder says and are kept for re-renders.

    Returns:
        The path of the written ``README.md``.

    Raises:
        FileNotFoundError: no output folder or no artifact in it.
        ValueError: an unknown fact (the message lists the known ones).
    """
    unknown = sorted(set(facts) - set(FACT_KEYS))
    if unknown:
        raise ValueError(f"unknown card facts {unknown}; known: {', '.join(sorted(FACT_KEYS))}")
    output = resolve_output(output_dir)
    run = _RunRecord(output)
    # The run's own facts (the task's summary and Hub task type, in results.json), then those kept from an
    # earlier render, then the caller's.
    stored = output.artifact_dir / FACTS_FILE
    facts = {**run.card_facts, **(json.loads(stored.read_text()) if stored.is_file() else {}), **facts}
    target = Path(out_dir) if out_dir is not None else output.artifact_dir
    target.mkdir(parents=True, exist_ok=True)

    images = _images(output, run, target, facts)
    card = _build_card(output, run, facts, images)
    readme = target / "README.md"
    tmp = readme.with_name("README.md.tmp")
    card.save(tmp)
    os.replace(tmp, readme)
    # images/ belongs to the card: drop what an earlier render put there and this card no longer shows.
    shown = set(card_images(readme.read_text(encoding="utf-8")))
    for stale in (target / "images").glob("*.png") if (target / "images").is_dir() else []:
        if f"images/{stale.name}" not in shown:
            stale.unlink()
    kept = {k: v for k, v in facts.items() if k in _PERSISTED and _jsonable(v)}
    if kept:
        (target / FACTS_FILE).write_text(json.dumps(kept, indent=2, sort_keys=True))
    return readme


# ---------------------------------------------------------------------------------------- what a run says
class _RunRecord:
    """The run folder's files, read once (all optional)."""

    def __init__(self, output: Output):
        import yaml

        config_file = output.run_file("config.yaml")
        self.config_text = config_file.read_text().strip() if config_file else ""
        self.config: dict = (yaml.safe_load(self.config_text) or {}) if self.config_text else {}
        results_file = output.run_file("results.json")
        self.results: dict = json.loads(results_file.read_text()) if results_file else {}
        metrics_file = output.run_file("metrics.jsonl")
        self.metrics: list[dict] = []
        for line in metrics_file.read_text().splitlines() if metrics_file else []:
            try:
                self.metrics.append(json.loads(line))
            except ValueError:  # a line torn by a killed run: the curve goes on without it
                logger.warning("%s: skipping a line that is not a record: %.60r", metrics_file, line)
        facts = self.results.get("card_facts") or {}
        self.card_facts = {k: v for k, v in facts.items() if k in FACT_KEYS}

    @property
    def data(self) -> dict:
        return self.config.get("data") or {}

    @property
    def dataset(self) -> str | None:
        return self.data.get("dataset")

    @property
    def steps(self) -> int | None:
        if "step" in self.results:
            return int(self.results["step"])
        return max((int(r["step"]) for r in self.metrics if "step" in r), default=None)

    def final_eval(self) -> dict[str, float]:
        """``eval/<metric>`` of results.json, else of the last evaluation in metrics.jsonl."""
        found = {k[5:]: v for k, v in self.results.items() if k.startswith("eval/")}
        if not found:
            for record in reversed(self.metrics):
                found = {k[5:]: v for k, v in record.items() if k.startswith("eval/")}
                if found:
                    break
        return {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------------------------------- the card
def _build_card(output: Output, run: _RunRecord, facts: dict, images: dict):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from hfx.resources import resource_path

    config = output.config
    kind = output.kind
    type_name = _type_name(output)
    method = facts.get("method") or run.config.get("task") or type_name
    model_name = facts.get("model_name") or _default_name(output, method)
    pipeline_tag = facts.get("pipeline_tag") or _pipeline_tag(output)
    task_type = facts.get("task_type") or pipeline_tag or "other"

    results = _eval_results(run, facts)
    eval_results = [
        EvalResult(task_type=task_type, dataset_type=r["dataset"], dataset_name=r["dataset"],
                   dataset_split=r.get("split"), metric_type=r["metric"], metric_name=r["metric"],
                   metric_value=r["value"],
                   metric_args={k: r[k] for k in ("num_samples", "extractor") if r.get(k) is not None} or None)
        for r in results
    ] or None
    base_model = config.get("base_model_name_or_path") if kind == "adapter" else None
    library_tag = "timm" if is_timm(config) else {"pipeline": "diffusers", "adapter": "peft", "model": "transformers"}[kind]
    tags = _unique(["hfx", library_tag, method, type_name, *(facts.get("tags") or [])])
    datasets = facts.get("datasets") or ([run.dataset] if run.dataset and "/" in run.dataset else None)
    card_data = ModelCardData(
        library_name="hfx", license=facts.get("license", "apache-2.0"), tags=tags, pipeline_tag=pipeline_tag,
        datasets=datasets, base_model=base_model if base_model and not os.path.isabs(base_model) else None,
        model_name=model_name, eval_results=eval_results,
    )
    ref = facts.get("repo_id") or str(output.artifact_dir)
    train_seconds = run.results.get("train_seconds")
    variables = dict(
        marker=MARKER, model_name=model_name,
        summary=facts.get("summary") or _summary(output, method, run),
        load_snippet=(facts["load_snippet"].replace("REPO_OR_PATH", ref) if facts.get("load_snippet")
                      else load_snippet(output, ref, remote_code=bool(facts.get("remote_code")))),
        samples=images.get("samples", []), loss_curve=images.get("loss"),
        results_section=_results_section(results, run),
        method=method, task=run.config.get("task", "not recorded"),
        dataset=f"`{run.dataset}`" if run.dataset else "not recorded",
        steps=run.steps if run.steps is not None else "not recorded",
        hardware=facts.get("hardware") or run.results.get("hardware") or "not recorded",
        train_time=facts.get("train_time") or _duration(train_seconds),
        versions=", ".join(f"{name} {_version(name)}" for name in _STACK),
        command=facts.get("command") or ("hfx train config.yaml  # config.yaml: the resolved configuration below"
                                         if run.config_text else "not recorded (this artifact has no run folder)"),
        config_yaml=run.config_text, base_model=base_model or "not recorded",
        limitations=facts.get("limitations") or DEFAULT_LIMITATIONS,
    )
    template = resource_path("hub_cards", f"{kind}.md")
    return ModelCard.from_template(card_data, template_path=str(template), **variables)


def _eval_results(run: _RunRecord, facts: dict) -> list[dict]:
    """One dict per metric: metric, value, dataset, split, num_samples, extractor."""
    dataset = run.dataset or "not recorded"
    split = run.data.get("eval_split")
    given = facts.get("eval_results")
    if given:
        required = {"metric", "value"}
        for entry in given:
            if not required <= set(entry):
                raise ValueError(f"each eval_results entry needs 'metric' and 'value'; got {entry}")
        return [{"dataset": dataset, "split": split, **entry} for entry in given]
    num_samples = facts.get("eval_num_samples") or run.data.get("max_eval_samples")
    return [{"metric": name, "value": round(value, 6), "dataset": dataset, "split": split,
             "num_samples": num_samples, "extractor": facts.get("eval_extractor")}
            for name, value in run.final_eval().items()]


def _results_section(results: list[dict], run: _RunRecord) -> str:
    if not results:
        return "No evaluation was run for this artifact."
    rows = [f"| {r['metric']} | {r['value']:.6g} | {r.get('num_samples') or 'not recorded'} | "
            f"{r.get('extractor') or '-'} |" for r in results]
    where = f"`{results[0]['dataset']}`" + (f" ({results[0]['split']} split)" if results[0].get("split") else "")
    step = f" at step {run.steps}" if run.steps is not None else ""
    return (f"Measured on {where}{step}. Sample-based metrics depend on the number of samples and the "
            "feature extractor: compare only numbers measured with the same ones.\n\n"
            "| metric | value | samples | feature extractor |\n|---|---|---|---|\n" + "\n".join(rows))


def artifact_class(output: Output) -> type | None:
    """The class of the artifact (its ``_class_name`` or ``architectures[0]``), found among hfx's registered
    classes and diffusers' and transformers'; None for an adapter, a timm model or an unknown class."""
    import hfx  # noqa: F401  (registers hfx's classes)
    from hfx._registry import find_class

    config = output.config
    if output.kind == "adapter" or is_timm(config):
        return None
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if isinstance(name, list):  # a remote-code export: [module, class]
        name = name[-1]
    return find_class(name) if isinstance(name, str) else None


def _usage(output: Output) -> list[str]:
    """What the artifact's class says a first use looks like (``hub_card_usage``), as snippet lines."""
    cls = artifact_class(output)
    usage = getattr(cls, "hub_card_usage", None)
    return usage(str(output.artifact_dir)).splitlines() if usage is not None else []


def load_snippet(output: Output, ref: str, remote_code: bool = False) -> str:
    """Python that loads this exact artifact from ``ref`` (a repo id or a folder) and uses it once (the use
    is the artifact class's ``hub_card_usage``, when it has one)."""
    config = output.config
    if output.kind == "pipeline":
        if remote_code and list_settings(config) and not os.path.isdir(ref):
            # diffusers' Hub loader reads list-valued settings as components: load a downloaded copy.
            lines = ["from diffusers import DiffusionPipeline", "from huggingface_hub import snapshot_download", "",
                     f'pipe = DiffusionPipeline.from_pretrained(snapshot_download("{ref}"), trust_remote_code=True)']
        elif remote_code:
            lines = ["from diffusers import DiffusionPipeline", "",
                     f'pipe = DiffusionPipeline.from_pretrained("{ref}", trust_remote_code=True)']
        else:
            lines = ["import hfx  # registers hfx's pipelines and their components with diffusers",
                     "from diffusers import DiffusionPipeline", "", f'pipe = DiffusionPipeline.from_pretrained("{ref}")']
        return "\n".join(lines + _usage(output))
    if output.kind == "adapter":
        auto = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification"}.get(config.get("task_type") or "", "AutoModel")
        base = config.get("base_model_name_or_path") or "BASE_MODEL"
        return "\n".join([
            "import hfx  # registers hfx's PEFT methods (ReLoRA) and model classes",
            "from peft import PeftModel", f"from transformers import {auto}", "",
            f'base = {auto}.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{ref}")',
        ])
    if is_timm(config):
        source = f"hf-hub:{ref}" if not os.path.isdir(ref) else f"local-dir:{ref}"
        return "\n".join(["import timm", "", f'model = timm.create_model("{source}", pretrained=True).eval()'])
    if "_class_name" in config:  # a diffusers model saved alone (a pipeline component)
        if remote_code:  # hfx.hub.export ships its code and an auto_map
            lines = ["from diffusers import AutoModel", "",
                     f'model = AutoModel.from_pretrained("{ref}", trust_remote_code=True)']
        else:
            cls = artifact_class(output)
            where = _public_module(cls) if cls is not None else "diffusers"
            name = config["_class_name"]
            lines = ["import hfx  # registers hfx's model classes", f"from {where} import {name}", "",
                     f'model = {name}.from_pretrained("{ref}")']
        return "\n".join(lines + _usage(output))
    auto = auto_class_name((config.get("architectures") or [None])[0])
    if remote_code:
        lines = [f"from transformers import {auto}", "",
                 f'model = {auto}.from_pretrained("{ref}", trust_remote_code=True)']
    else:
        lines = ["import hfx  # registers hfx's model classes with transformers", f"from transformers import {auto}",
                 "", f'model = {auto}.from_pretrained("{ref}")']
    return "\n".join(lines + _usage(output))


def _public_module(cls: type) -> str:
    """The shortest package path that exports ``cls`` (``hfx.models.noisy_classifier`` for its modeling file)."""
    import importlib

    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = importlib.import_module(".".join(parts[:end]))
        if getattr(module, cls.__name__, None) is cls:
            return module.__name__
    return cls.__module__


def list_settings(model_index: dict) -> list[str]:
    """Settings of a ``model_index.json`` whose values are lists but not ``[library, class]`` components.
    diffusers' Hub loader takes every list for a component and fails on these (a local folder loads)."""
    return [key for key, value in model_index.items() if not key.startswith("_") and isinstance(value, list)
            and not (len(value) == 2 and all(part is None or isinstance(part, str) for part in value))]


def is_timm(config: dict) -> bool:
    """A timm model's config.json (``architecture`` + ``pretrained_cfg``) rather than a transformers one."""
    return "model_type" not in config and ("pretrained_cfg" in config or "architecture" in config)


def _pipeline_tag(output: Output) -> str | None:
    config = output.config
    declared = getattr(artifact_class(output), "hub_pipeline_tag", None)  # what the class says of itself
    if declared:
        return declared
    if output.kind == "adapter":
        return {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification"}.get(config.get("task_type") or "")
    if is_timm(config):
        return "image-classification"
    architecture = (config.get("architectures") or [""])[0]
    for suffix, tag in (("ForCausalLM", "text-generation"), ("ForImageClassification", "image-classification"),
                        ("ForSequenceClassification", "text-classification")):
        if architecture.endswith(suffix):
            return tag
    return None


def _type_name(output: Output) -> str:
    config = output.config
    if output.kind == "pipeline":
        return config["_class_name"]
    if output.kind == "adapter":
        return str(config.get("peft_type", "adapter")).split(" (", 1)[0].lower()  # hfx types carry a sentence
    return config.get("model_type") or config.get("architecture") or "model"


def _default_name(output: Output, method: str) -> str:
    folder = output.run_dir or output.artifact_dir
    return f"hfx-{method}-{folder.name}".replace("_", "-")


def _summary(output: Output, method: str, run: _RunRecord) -> str:
    what = {"pipeline": f"A diffusers pipeline (`{_type_name(output)}`)",
            "adapter": f"A PEFT adapter ({_type_name(output)}) for `{output.config.get('base_model_name_or_path')}`",
            "model": f"A {'timm' if is_timm(output.config) else 'transformers'} model (`{_type_name(output)}`)"}[output.kind]
    data = f" on `{run.dataset}`" if run.dataset else ""
    return f"{what} trained{data} with [hfx](https://github.com/hfx) (method: `{method}`)."


# ---------------------------------------------------------------------------------------- images
def _images(output: Output, run: _RunRecord, target: Path, facts: dict) -> dict:
    """Copy or make the card's images under ``target/images``; returns their card-relative paths."""
    images_dir = target / "images"
    found: dict[str, Any] = {}
    if plot_loss_curve(run.metrics, images_dir / "loss.png"):
        found["loss"] = "images/loss.png"
    sources = [Path(p) for p in facts.get("sample_images") or []]
    if not sources and output.run_dir is not None:
        sources = latest_samples(output.run_dir / "samples")
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample images not found: {', '.join(missing)}")
    samples = []
    for source in sources:
        name = f"images/{source.name}"
        images_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target / name)
        samples.append(name)
    earlier = output.artifact_dir / "images" / "samples.png"
    if not samples and earlier.is_file():  # sampled by an earlier render: keep it (delete it to sample again)
        images_dir.mkdir(parents=True, exist_ok=True)
        if earlier.resolve() != (images_dir / "samples.png").resolve():
            shutil.copyfile(earlier, images_dir / "samples.png")
        samples.append("images/samples.png")
    if not samples and facts.get("sample_grid", True):
        grid = sample_grid(output)
        if grid is not None:
            images_dir.mkdir(parents=True, exist_ok=True)
            grid.save(images_dir / "samples.png")
            samples.append("images/samples.png")
    found["samples"] = samples
    return found


def latest_samples(folder: Path) -> list[Path]:
    """The newest image of each series in a run's ``samples/`` folder (``<series>step-<n>.png``, e.g.
    ``samples-step-0000040.png`` and ``reconstructions-step-0000040.png``)."""
    latest: dict[str, Path] = {}
    for path in sorted(folder.glob("*.png")):  # zero-padded steps sort in order
        latest[re.sub(r"step-\d+$", "", path.stem)] = path
    return list(latest.values())


def plot_loss_curve(records: list[dict], path: Path) -> bool:
    """Plot every ``loss*`` series of metrics.jsonl records against ``step`` (and ``eval/*`` series on a
    second panel) into ``path``. Returns False (and writes nothing) when there is no loss to plot."""
    series: dict[str, tuple[list, list]] = {}
    for record in records:
        for key, value in record.items():
            if (key.startswith("loss") or key.startswith("eval/")) and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    train = {k: v for k, v in series.items() if k.startswith("loss")}
    if not train:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    evals = {k: v for k, v in series.items() if k.startswith("eval/")}
    panels = 2 if evals else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.2), squeeze=False)
    for key, (steps, values) in train.items():
        axes[0][0].plot(steps, values, label=key, linewidth=1.2)
    axes[0][0].set(xlabel="step", ylabel="training loss", title="training loss")
    axes[0][0].legend(fontsize=8)
    for key, (steps, values) in evals.items():
        axes[0][1].plot(steps, values, marker="o", label=key[5:], linewidth=1.2)
    if evals:
        axes[0][1].set(xlabel="step", title="evaluation")
        axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def sample_grid(output: Output, seed: int = 0):
    """A small sample grid (PIL image) from the artifact class's ``hub_card_samples``; None for a class
    without one."""
    from diffusers.utils import make_image_grid

    samples = getattr(artifact_class(output), "hub_card_samples", None)
    if samples is None:
        return None
    images, rows = samples(str(output.artifact_dir), seed)
    return make_image_grid(_to_pil(images), rows=rows, cols=len(images) // rows)


def _to_pil(images):
    from PIL import Image

    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]


# ---------------------------------------------------------------------------------------- helpers
def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _unique(items: list) -> list:
    seen = []
    for item in items:
        if item and item not in seen:
            seen.append(item)
    return seen


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False
