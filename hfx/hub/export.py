"""Remote-code export: a copy of an hfx artifact that loads where hfx is not installed.

- A transformers model: the defining ``configuration_*.py`` / ``modeling_*.py`` (and their ``from .x``
  siblings) are copied next to the weights and ``config.json`` gets an ``auto_map``, so
  ``AutoModel.from_pretrained(path_or_repo, trust_remote_code=True)`` loads it.
- A diffusers pipeline: the pipeline module goes to the root and ``model_index.json``'s ``_class_name``
  becomes ``["<module>", "<Class>"]``; each hfx component (a class from an hfx module) ships its module as
  ``<component>/<module>.py`` and is recorded as ``["<module>", "<Class>"]``. diffusers downloads single
  files only, so each module must be self-contained: an ``import`` of hfx is allowed in the pipeline
  module only for component classes (it is replaced by a name the annotations can use). Then
  ``DiffusionPipeline.from_pretrained(path_or_repo, trust_remote_code=True)`` loads it.

Weights are copied byte for byte, so the export computes exactly what the original does. Adapters have
no code of their own to ship (peft loads them); exporting one is an error.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
import shutil
from pathlib import Path

from hfx.hub.artifact import Output, artifact_files, auto_class_name, resolve_output
from hfx.hub.cards import FACTS_FILE, MARKER, list_settings, render_card

logger = logging.getLogger(__name__)

_HFX_IMPORT = re.compile(r"^(?:from\s+(?P<module>hfx(?:\.[\w.]+)?)\s+import\s+(?P<names>\([^)]*\)|[^\n]+)|import\s+hfx\b[^\n]*)$",
                         re.MULTILINE)


def export_remote_code(output_dir: str | Path, out_dir: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Write the remote-code export of an output folder (see :mod:`hfx.hub.artifact`) to ``out_dir``.

    Args:
        output_dir: a run folder or a folder written by ``save_pretrained``.
        out_dir: the new folder; default ``<output_dir>/remote-code`` for a run, ``<folder>-remote-code``
            beside a bare artifact.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: no artifact in ``output_dir``.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: an adapter, or code that cannot ship (a module importing hfx).
    """
    output = resolve_output(output_dir)
    if output.kind == "adapter":
        raise ValueError(f"{output.artifact_dir} is a PEFT adapter: peft loads it without hfx's code for built-in "
                         "methods, and hfx methods (ReLoRA) need hfx installed; there is no remote-code export")
    if out_dir is None:
        out_dir = (output.run_dir / "remote-code" if output.run_dir is not None
                   else output.artifact_dir.with_name(output.artifact_dir.name + "-remote-code"))
    out = Path(out_dir)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists: remove it or pass overwrite=True (--overwrite)")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_export(output, output_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.replace(out)
    return out


def _write_export(output: Output, output_dir: str | Path, tmp: Path) -> None:
    """Copy the artifact into ``tmp``, ship its code, and write a card for loading it without hfx."""
    for relative in artifact_files(output.artifact_dir):
        if relative in (FACTS_FILE, "README.md") or relative.startswith("images/"):
            continue  # the card is rendered again below, for loading without hfx
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(output.artifact_dir / relative, tmp / relative)
    if output.kind == "model":
        _export_model(tmp)
    else:
        _export_pipeline(tmp)
    readme = output.artifact_dir / "README.md"
    if not readme.is_file() or MARKER in readme.read_text(encoding="utf-8"):
        render_card(output_dir, out_dir=tmp, remote_code=True)  # the snippet for loading without hfx
    else:  # a hand-written card is kept as it is
        for relative in ["README.md", *(p for p in artifact_files(output.artifact_dir) if p.startswith("images/"))]:
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(output.artifact_dir / relative, tmp / relative)


# ---------------------------------------------------------------------------------------- models
def _export_model(folder: Path) -> None:
    """Copy the config and model classes' source files into ``folder`` and write ``auto_map``."""
    import transformers

    import hfx  # noqa: F401  (registers hfx's model types with transformers)

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if "model_type" not in config:
        raise ValueError(f"{config_path} has no model_type: not a transformers model (a timm model loads with "
                         "timm alone); the remote-code export covers transformers models and diffusers pipelines")
    config_class = transformers.AutoConfig.for_model(config["model_type"]).__class__
    if not config_class.__module__.startswith("hfx."):
        logger.info("%s is a transformers built-in (%s): it loads without hfx as it is", folder, config["model_type"])
        return
    architecture = (config.get("architectures") or [None])[0]
    model_class = _model_class(config_class, architecture)
    auto_name = auto_class_name(model_class.__name__)
    auto_map = dict(config.get("auto_map") or {})
    auto_map["AutoConfig"] = _ship_module(config_class, folder)
    auto_map[auto_name] = _ship_module(model_class, folder)
    if auto_name != "AutoModel":
        auto_map.setdefault("AutoModel", auto_map[auto_name])
    config["auto_map"] = auto_map
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _model_class(config_class: type, architecture: str | None) -> type:
    """The hfx model class for ``config_class``: the one named in ``architectures`` when registered."""
    import transformers

    candidates = []
    for name in dir(transformers):
        if name.startswith("AutoModel"):
            mapping = getattr(getattr(transformers, name), "_model_mapping", None)
            try:
                candidates.append(mapping[config_class])
            except (KeyError, TypeError):
                continue
    for candidate in candidates:
        if candidate.__name__ == architecture:
            return candidate
    if not candidates:
        raise ValueError(f"no transformers Auto class knows {config_class.__name__}: is it registered by hfx?")
    return candidates[0]


def _ship_module(cls: type, folder: Path) -> str:
    """Copy the file defining ``cls`` and its ``from .x import`` siblings into ``folder``; returns
    ``"<module>.<Class>"`` for ``auto_map``."""
    from transformers.dynamic_module_utils import get_relative_import_files

    source = Path(inspect.getfile(cls))
    for path in [source, *map(Path, get_relative_import_files(str(source)))]:
        _check_self_contained(path)
        shutil.copy2(path, folder / path.name)
    return f"{source.stem}.{cls.__name__}"


def _check_self_contained(path: Path) -> None:
    if _HFX_IMPORT.search(path.read_text(encoding="utf-8")):
        raise ValueError(f"{path} imports hfx, so it cannot run where hfx is not installed: keep model files "
                         "self-contained (third-party imports and `from .sibling import` only)")


# ---------------------------------------------------------------------------------------- pipelines
def _export_pipeline(folder: Path) -> None:
    """Ship the pipeline module at the root and each hfx component's module in its folder."""
    import hfx.pipelines

    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    class_name = index["_class_name"]
    pipeline_class = getattr(hfx.pipelines, class_name, None) if isinstance(class_name, str) else None
    if pipeline_class is None:
        raise ValueError(f"{index_path}: _class_name {class_name!r} is not a pipeline of hfx.pipelines")
    for name, value in index.items():
        if name.startswith("_") or not (isinstance(value, list) and len(value) == 2 and value[0]):
            continue
        library, cls_name = value
        if library.split(".")[0] != "hfx":
            continue
        module = importlib.import_module(library)
        source = Path(inspect.getfile(module))
        text = source.read_text(encoding="utf-8")
        _check_self_contained(source)
        if re.search(r"^\s*from\s+\.", text, re.MULTILINE):
            raise ValueError(f"{source} uses relative imports: diffusers downloads component code as single files")
        shutil.copy2(source, folder / name / source.name)
        index[name] = [source.stem, cls_name]
    lists = list_settings(index)
    if lists:
        logger.warning("%s: the list-valued setting(s) %s make DiffusionPipeline.from_pretrained(<repo id>, "
                       "trust_remote_code=True) fail on the Hub side (diffusers reads lists as components); loading "
                       "a local folder (or a snapshot_download of the repo, as the card shows) works",
                       index_path, ", ".join(lists))
    source = Path(inspect.getfile(pipeline_class))
    (folder / source.name).write_text(_without_hfx_imports(source), encoding="utf-8")
    index["_class_name"] = [source.stem, class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _without_hfx_imports(source: Path) -> str:
    """The pipeline module's text with each ``from hfx... import <Model class>`` replaced by a plain alias:
    such names serve only as annotations of components, which diffusers builds from their own folders."""
    import torch

    text = source.read_text(encoding="utf-8")

    def replace(match: re.Match) -> str:
        names = [n.strip() for n in (match["names"] or "").strip("()").replace("\n", " ").split(",") if n.strip()]
        module = importlib.import_module(match["module"]) if match["module"] else None
        shippable = module is not None and names and all(
            " as " not in n and isinstance(getattr(module, n, None), type) and issubclass(getattr(module, n), torch.nn.Module)
            for n in names)
        if not shippable:
            raise ValueError(f"{source}: `{match.group(0).strip()}` imports from hfx something other than a model "
                             "class used as a component; the remote-code export cannot ship it")
        return "\n".join(f"{n} = torch.nn.Module  # hfx export: the component's code ships in its folder" for n in names)

    rewritten = _HFX_IMPORT.sub(replace, text)
    if not re.search(r"^import torch$", rewritten, re.MULTILINE):
        raise ValueError(f"{source} must `import torch` for the remote-code export")
    return rewritten
