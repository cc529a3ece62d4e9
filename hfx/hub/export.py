"""Remote-code export: a copy of an hfx artifact that loads where hfx is not installed.

What each loader fetches decides how the code ships:

- A **transformers model** (``config.json`` with ``model_type``): the defining ``configuration_*.py`` /
  ``modeling_*.py`` and their ``from .x import`` siblings are copied next to the weights and ``config.json``
  gets an ``auto_map``. transformers follows relative imports itself, locally and on the Hub
  (``transformers.dynamic_module_utils.get_cached_module_file``), so the files ship as they are and
  ``AutoModel.from_pretrained(path_or_repo, trust_remote_code=True)`` loads the model.
- A **diffusers model** (``config.json`` with ``_class_name``, e.g. a ``NoisyClassifier`` saved alone): its
  module ships as ONE generated file at the root and ``config.json`` gets ``auto_map["AutoModel"]``, the key
  ``diffusers.AutoModel.from_pretrained(path_or_repo, trust_remote_code=True)`` reads.
- A **diffusers pipeline**: the pipeline module goes to the root as one generated file and ``_class_name``
  becomes ``["<module>", "<Class>"]``; each hfx component ships its module as one generated file
  ``<component>/<module>.py`` and is recorded as ``["<module>", "<Class>"]``. One file each, because
  ``DiffusionPipeline.download`` fetches exactly ``{component}/{module}.py`` for a custom component (its
  ``allow_patterns``), and ``get_class_obj_and_candidates`` then loads it from the downloaded folder, where
  ``get_cached_module_file`` would copy each ``from .x import`` sibling from, and none was downloaded. The
  root pipeline file's siblings would be fetched only by the Hub branch of ``get_cached_module_file`` while
  ``download`` resolves the class, yet ``from_pretrained`` imports it again from the snapshot folder
  (``_resolve_custom_pipeline_and_cls``): one file does not depend on that. Then
  ``DiffusionPipeline.from_pretrained(path_or_repo, trust_remote_code=True)`` loads it.

A generated file is the module's own source with the hfx modules it imports inlined before it (dependencies
first, each under a comment naming its file; imports hoisted and de-duplicated), so it is derived from the
real sources and no module is special-cased. One exception keeps annotations honest without duplicating a
component's code: a ``torch.nn.Module`` class from hfx that a module names only in annotations (a pipeline's
``classifier: NoisyClassifier | None``) becomes ``torch.nn.Module``, its base; its code ships in its own
folder. Two inlined modules that bind one top-level name to different things are an error: merged, one would
silently replace the other.

Weights are copied byte for byte (after checking that every safetensors and JSON file reads), so the export
computes exactly what the original does. Adapters have no code of their own to ship (peft loads them);
exporting one is an error.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import json
import logging
import re
import shutil
import sys
from pathlib import Path

from hfx.hub.artifact import Output, artifact_files, artifact_kind, auto_class_name, resolve_output
from hfx.hub.cards import FACTS_FILE, MARKER, list_settings, render_card

logger = logging.getLogger(__name__)

_PACKAGE = __name__.split(".")[0]  # imports of this package cannot run where it is not installed
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def export_remote_code(output_dir: str | Path, out_dir: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Write the remote-code export of an output folder (see :mod:`hfx.hub.artifact`) to ``out_dir``.

    Args:
        output_dir: a run folder or a folder written by ``save_pretrained``.
        out_dir: the new folder; default ``<output_dir>/remote-code`` for a run, ``<folder>-remote-code``
            beside a bare artifact.
        overwrite: replace an existing ``out_dir`` (only an earlier export or an empty folder); the old one
            is removed once the new one is complete.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: no artifact in ``output_dir``.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False; ``out_dir`` or a folder above it is a
            file; ``out_dir`` holds something other than an export.
        ValueError: an adapter, a damaged file (invalid JSON, a truncated safetensors file, missing
            weights), ``out_dir`` inside the artifact, or code that cannot ship.
    """
    if Path(output_dir).expanduser().is_file():
        raise FileNotFoundError(f"{output_dir} is a file, not an output folder (a run folder or a saved artifact)")
    output = resolve_output(output_dir)
    if output.kind == "adapter":
        raise ValueError(f"{output.artifact_dir} is a PEFT adapter: peft loads it without hfx's code for built-in "
                         "methods, and hfx methods (ReLoRA) need hfx installed; there is no remote-code export")
    if out_dir is None:
        out_dir = (output.run_dir / "remote-code" if output.run_dir is not None
                   else output.artifact_dir.with_name(output.artifact_dir.name + "-remote-code"))
    out = Path(out_dir).expanduser()
    _check_out_dir(out, output.artifact_dir, overwrite)
    files = artifact_files(output.artifact_dir)
    _check_readable(output.artifact_dir, files)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_export(output, output_dir, files, tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # the earlier export goes only once the new one is complete
        old = out.with_name(out.name + ".old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        out.replace(old)
        tmp.replace(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.replace(out)
    return out


def _check_out_dir(out: Path, artifact_dir: Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that cannot be written, or whose replacement would destroy something else."""
    above = next((parent for parent in out.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        raise FileExistsError(f"cannot write the export to {out}: {above} is a file, not a folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: choose another output folder for the export")
    resolved = out.resolve()
    if resolved == artifact_dir or artifact_dir in resolved.parents or resolved in artifact_dir.parents:
        raise ValueError(f"the export folder {out} would overlap the artifact {artifact_dir}: write it elsewhere")
    if out.is_dir():
        if not overwrite:
            raise FileExistsError(f"{out} already exists: remove it or pass overwrite=True (--overwrite)")
        if artifact_kind(out) is None and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not an export (no model_index.json or config.json): "
                                  "refusing to replace it")


def _check_readable(folder: Path, files: list[str]) -> None:
    """Read every JSON file and every safetensors header of the artifact: a damaged file fails here, naming
    itself, rather than in the user's ``from_pretrained``.

    Raises:
        ValueError: invalid JSON, an unreadable or truncated safetensors file, a weights index naming a
            missing shard.
    """
    from safetensors import safe_open

    for relative in files:
        path = folder / relative
        if relative.endswith(".json"):
            config = _read_json(path)
            for shard in sorted(set((config.get("weight_map") or {}).values())) if isinstance(config, dict) else []:
                if not (path.parent / shard).is_file():
                    raise ValueError(f"{path} names the weights shard {shard}, which is missing")
        elif relative.endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="pt") as weights:
                    weights.keys()
            except Exception as err:  # safetensors raises its own SafetensorError
                raise ValueError(f"{path} is not a readable safetensors file ({err}): it is truncated or corrupt; "
                                 "save the artifact again") from None


def _check_weights(folder: Path, files: list[str]) -> None:
    """Every model folder of the artifact (one with ``config.json``) holds a weights file.

    Raises:
        ValueError: naming the folder without weights.
    """
    for relative in files:
        if Path(relative).name == "config.json":
            model_dir = (folder / relative).parent
            if not any(p.suffix in _WEIGHT_SUFFIXES for p in model_dir.iterdir() if p.is_file()):
                raise ValueError(f"{model_dir} has config.json but no weights file: the artifact is incomplete")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({err}): the artifact is damaged; save it again") from None


def _write_export(output: Output, output_dir: str | Path, files: list[str], tmp: Path, out: Path) -> None:
    """Copy the artifact into ``tmp``, ship its code, and write a card for loading it without hfx from ``out``
    (where ``tmp`` goes when complete)."""
    for relative in files:
        if relative in (FACTS_FILE, "README.md") or relative.startswith("images/"):
            continue  # the card is rendered again below, for loading without hfx
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(output.artifact_dir / relative, tmp / relative)
    export = _export_model if output.kind == "model" else _export_pipeline
    card_facts = export(tmp, output.artifact_dir)
    _check_weights(output.artifact_dir, files)  # once the kind is known to be exportable
    readme = output.artifact_dir / "README.md"
    if not readme.is_file() or MARKER in readme.read_text(encoding="utf-8"):
        # The snippet loads this folder without hfx (push renders the card again, naming the repo).
        render_card(output_dir, out_dir=tmp, remote_code=True, repo_id=str(out.resolve()), **card_facts)
    else:  # a hand-written card is kept as it is
        for relative in ["README.md", *(p for p in files if p.startswith("images/"))]:
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(output.artifact_dir / relative, tmp / relative)


# ---------------------------------------------------------------------------------------- models
def _export_model(folder: Path, artifact_dir: Path) -> dict:
    """Ship the code of the model copied to ``folder`` (from ``artifact_dir``, which messages name) and point
    ``config.json``'s ``auto_map`` at it. Returns card facts for the load snippet (none when the card's own
    snippet fits)."""
    config = _read_json(folder / "config.json")
    if "model_type" in config:
        _export_transformers_model(folder, artifact_dir / "config.json", config)
        return {}
    if "_class_name" in config:
        return _export_diffusers_model(folder, artifact_dir / "config.json", config)
    raise ValueError(f"{artifact_dir / 'config.json'} has no model_type: not a transformers model, nor a diffusers one (no _class_name; "
                     "a timm model loads with timm alone); the remote-code export covers transformers and diffusers "
                     "models and diffusers pipelines")


def _export_transformers_model(folder: Path, config_path: Path, config: dict) -> None:
    """Copy the config and model classes' source files into ``folder`` and write ``auto_map`` into its
    ``config.json`` (``config_path``, the artifact's, is for messages)."""
    import transformers

    import hfx  # noqa: F401  (registers hfx's model types with transformers)

    try:
        config_class = transformers.AutoConfig.for_model(config["model_type"]).__class__
    except ValueError:
        raise ValueError(f"{config_path}: model_type {config['model_type']!r} is neither a transformers model "
                         "nor one hfx registers") from None
    if not _is_ours(config_class):
        logger.info("%s is a transformers built-in (%s): it loads without hfx as it is", config_path, config["model_type"])
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
    _write_json(folder / "config.json", config)


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
    """Copy the file defining ``cls`` and its ``from .x import`` siblings into ``folder`` (transformers fetches
    such siblings itself); returns ``"<module>.<Class>"`` for ``auto_map``."""
    from transformers.dynamic_module_utils import get_relative_import_files

    source = Path(inspect.getfile(cls))
    for path in [source, *map(Path, get_relative_import_files(str(source)))]:
        for node, _ in _imports_of(_parse(path)):
            if _is_internal(node) and not (isinstance(node, ast.ImportFrom) and node.level == 1):
                raise ValueError(f"{path}:{node.lineno} imports {_describe(node)}: a transformers model file may "
                                 f"import only installed packages and `from .sibling import`, so keep model "
                                 "families self-contained")
        shutil.copy2(path, folder / path.name)
    return f"{source.stem}.{cls.__name__}"


def _export_diffusers_model(folder: Path, config_path: Path, config: dict) -> dict:
    """Ship a diffusers model's module as one file at the root of ``folder``, registered in its config's
    ``auto_map["AutoModel"]`` (``config_path``, the artifact's, is for messages)."""
    import diffusers

    import hfx  # noqa: F401  (imports every hfx component module)

    class_name = config["_class_name"]
    if isinstance(class_name, str) and hasattr(diffusers, class_name):
        logger.info("%s is a diffusers built-in (%s): it loads without hfx as it is", config_path, class_name)
        return {}
    cls = _class_in_package(class_name, diffusers.ConfigMixin)
    if cls is None:
        raise ValueError(f"{config_path}: _class_name {class_name!r} is neither a diffusers model nor one hfx defines")
    module = _write_one_file(cls.__module__, folder / f"{cls.__module__.rsplit('.', 1)[-1]}.py")
    config["auto_map"] = {**(config.get("auto_map") or {}), "AutoModel": f"{module}.{cls.__name__}"}
    _write_json(folder / "config.json", config)
    # The card's generic model snippet is transformers'; this model loads through diffusers' AutoModel.
    return {"load_snippet": "from diffusers import AutoModel\n\n"
                            'model = AutoModel.from_pretrained("REPO_OR_PATH", trust_remote_code=True)'}


def _class_in_package(name: object, base: type) -> type | None:
    """The class called ``name``, a subclass of ``base``, defined in an imported module of this package."""
    found = {getattr(module, name) for module_name, module in list(sys.modules.items())
             if isinstance(name, str) and module_name.split(".")[0] == _PACKAGE
             and isinstance(getattr(module, name, None), type) and getattr(module, name).__module__ == module_name}
    found = [cls for cls in found if issubclass(cls, base)]
    return found[0] if len(found) == 1 else None


def _is_ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] == _PACKAGE


# ---------------------------------------------------------------------------------------- pipelines
def _export_pipeline(folder: Path, artifact_dir: Path) -> dict:
    """Ship the pipeline module at the root of ``folder`` and each hfx component's module in its folder, one
    file each (``artifact_dir``, where ``folder`` was copied from, is for messages)."""
    import hfx.pipelines

    index = _read_json(folder / "model_index.json")
    index_path = artifact_dir / "model_index.json"
    class_name = index.get("_class_name")
    pipeline_class = getattr(hfx.pipelines, class_name, None) if isinstance(class_name, str) else None
    if pipeline_class is None:
        raise ValueError(f"{index_path}: _class_name {class_name!r} is not a pipeline of hfx.pipelines")
    for name, value in index.items():
        if name.startswith("_") or not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
            continue
        library, cls_name = value
        if library.split(".")[0] != _PACKAGE:
            continue
        if not (folder / name).is_dir():
            raise ValueError(f"{index_path}: component {name} ({library}.{cls_name}) has no folder {artifact_dir / name}")
        if not isinstance(getattr(_source(library).module, cls_name, None), type):
            raise ValueError(f"{index_path}: component {name} names {cls_name}, which {library} does not define")
        index[name] = [_write_one_file(library, folder / name / f"{library.rsplit('.', 1)[-1]}.py"), cls_name]
    lists = list_settings(index)
    if lists:
        logger.warning("%s: the list-valued setting(s) %s make DiffusionPipeline.from_pretrained(<repo id>, "
                       "trust_remote_code=True) fail on the Hub side (diffusers reads lists as components); loading "
                       "a local folder (or a snapshot_download of the repo, as the card shows) works",
                       index_path, ", ".join(lists))
    module = pipeline_class.__module__
    index["_class_name"] = [_write_one_file(module, folder / f"{module.rsplit('.', 1)[-1]}.py"), class_name]
    _write_json(folder / "model_index.json", index)
    return {}


def _write_json(path: Path, config: dict) -> None:
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------- one-file modules
@dataclasses.dataclass
class _Source:
    """A module's parsed source."""

    name: str
    path: Path
    text: str
    tree: ast.Module

    @property
    def module(self):
        """The imported module (what its names are bound to)."""
        return importlib.import_module(self.name)

    @property
    def package(self) -> str:
        """What a relative import in this module is relative to."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]

    @property
    def shown_path(self) -> str:
        """The path inside the package's source tree, for comments and messages."""
        return "/".join([*self.name.split(".")[:-1], self.path.name])


def _source(module_name: str) -> _Source:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name} to ship its code: {err}") from None
    path = Path(inspect.getfile(module))
    if path.suffix != ".py":
        raise ValueError(f"{module_name} is not a Python source file ({path}): its code cannot ship")
    text = path.read_text(encoding="utf-8")
    return _Source(module_name, path, text, _parse(path, text))


def _parse(path: Path, text: str | None = None) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8") if text is None else text, filename=str(path))


def _imports_of(tree: ast.Module):
    """Every import statement of a module, with whether it sits at the top level."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, id(node) in top


def _is_internal(node: ast.Import | ast.ImportFrom) -> bool:
    """An import of this package (absolute or relative): unavailable where the export runs."""
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == _PACKAGE
    return any(alias.name.split(".")[0] == _PACKAGE for alias in node.names)


def _describe(node: ast.Import | ast.ImportFrom) -> str:
    return ast.unparse(node).replace("\n", " ")


def _resolve(source: _Source, node: ast.ImportFrom) -> str:
    """The absolute name of the module an internal ``from ... import`` reads."""
    if node.level == 0:
        return node.module
    return importlib.util.resolve_name("." * node.level + (node.module or ""), source.package)


def _defined_where(module_name: str, attr: str, importer: str) -> tuple[str, str]:
    """Follow re-exports (a package's ``__init__``) to the module whose own code binds ``attr``; returns
    ``(module, name there)``."""
    source = _source(module_name)
    for node in source.tree.body:
        if isinstance(node, ast.ImportFrom) and _is_internal(node):
            for alias in node.names:
                if (alias.asname or alias.name) == attr:
                    return _defined_where(_resolve(source, node), alias.name, importer)
    if attr in _top_level_names(source.tree.body):
        return module_name, attr
    if importlib.util.find_spec(f"{module_name}.{attr}") is not None:
        raise ValueError(f"{importer} imports the module {module_name}.{attr}: a one-file export can inline names "
                         f"only; write `from {module_name}.{attr} import <name>`")
    raise ValueError(f"{importer} imports {attr} from {module_name}, which does not define it")


def _top_level_names(statements: list[ast.stmt]) -> set[str]:
    """Names that statements bind in the module namespace (not inside functions or classes)."""
    names = set()
    for statement in statements:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(statement.name)
        elif isinstance(statement, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name.split(".")[0]) for alias in statement.names)
        else:
            stack = [statement]
            while stack:
                node = stack.pop()
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    names.update((alias.asname or alias.name.split(".")[0]) for alias in node.names)
                elif not isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                    stack.extend(ast.iter_child_nodes(node))
    return names


def _names_used_outside_annotations(tree: ast.Module) -> set[str]:
    """Names a module reads anywhere but in annotations (which ``from __future__ import annotations`` or
    ``typing.get_type_hints`` alone evaluate)."""
    used = set()

    class Visitor(ast.NodeVisitor):
        def visit_Name(self, node: ast.Name) -> None:
            used.add(node.id)

        def visit_arg(self, node: ast.arg) -> None:  # a parameter: its annotation only
            pass

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:  # everything but the return annotation
            for child in [*node.decorator_list, node.args, *node.body]:
                self.visit(child)

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
            self.visit(node.target)
            if node.value is not None:
                self.visit(node.value)

    Visitor().visit(tree)
    return used


def _annotation_only_component(source: _Source, bound: str, obj: object) -> bool:
    """A ``torch.nn.Module`` class that ``source`` names in annotations only: ``torch.nn.Module`` stands in."""
    import torch

    return (isinstance(obj, type) and issubclass(obj, torch.nn.Module)
            and bound not in _names_used_outside_annotations(source.tree))


def bundle_module(module_name: str) -> str:
    """The source of ``module_name`` as one file that imports nothing of this package.

    The modules it imports from the package (relative or absolute ``from ... import``, followed through
    re-exports) are inlined before it, dependencies first; all top-level imports are hoisted and
    de-duplicated, and a statement repeated verbatim (``logger = logging.getLogger(__name__)``) is kept once;
    a ``torch.nn.Module`` class named only in annotations becomes ``torch.nn.Module``. The names are those of
    the real modules, read by :func:`ast.parse`; the objects they are bound to (for the clash check) are the
    imported modules'.

    Raises:
        ValueError: an import the file cannot do without (``import hfx``, a star import, an import of the
            package inside a function or block), an import cycle, two inlined modules binding one name to
            different objects, or a result that still imports the package.
    """
    order: list[str] = []  # modules to inline, dependencies first
    stand_ins: dict[str, str] = {}  # bound name -> importing module (torch.nn.Module stands in)
    renames: dict[str, list[str]] = {}  # module -> `bound = name` for its `from m import name as bound`
    bound_objects: dict[str, dict[str, object]] = {}  # module -> name -> object, for the clash check

    def visit(module_name: str, chain: tuple[str, ...]) -> None:
        if module_name in order:
            return
        if module_name in chain:
            raise ValueError(f"import cycle: {' -> '.join([*chain[chain.index(module_name):], module_name])}")
        source = _source(module_name)
        live = source.module
        bound_objects[module_name] = {}
        for node, top_level in _imports_of(source.tree):
            if not _is_internal(node):
                continue
            where = f"{source.shown_path}:{node.lineno}: `{_describe(node)}`"
            if not top_level:
                raise ValueError(f"{where} imports {_PACKAGE} inside a function or block: the remote-code export "
                                 "inlines top-level `from ... import` only")
            if isinstance(node, ast.Import):
                raise ValueError(f"{where}: a one-file export can inline `from ... import <name>` only")
            for alias in node.names:
                if alias.name == "*":
                    raise ValueError(f"{where}: a star import cannot be inlined; import the names")
                bound = alias.asname or alias.name
                obj = getattr(live, bound, None)
                bound_objects[module_name][bound] = obj
                defining, name = _defined_where(_resolve(source, node), alias.name, source.shown_path)
                if _annotation_only_component(source, bound, obj):
                    stand_ins.setdefault(bound, defining)
                    continue
                visit(defining, (*chain, module_name))
                if bound != name:
                    renames.setdefault(module_name, []).append(f"{bound} = {name}")
        order.append(module_name)

    visit(module_name, ())
    inlined = {name for module in order for name in _top_level_names(
        [s for s in _source(module).tree.body if not (isinstance(s, (ast.Import, ast.ImportFrom)) and _is_internal(s))])}
    stand_ins = {bound: where for bound, where in stand_ins.items() if bound not in inlined}
    return _assemble(order, stand_ins, renames, bound_objects)


def _assemble(order: list[str], stand_ins: dict[str, str], renames: dict[str, list[str]],
              bound_objects: dict[str, dict[str, object]]) -> str:
    """Write the modules of ``order`` (the target last) as one file; see :func:`bundle_module`."""
    from hfx import __version__

    target = _source(order[-1])
    imports: dict[str, list[str]] = {}  # "import x" or "from m" -> names, in order of first appearance
    seen_statements: set[str] = set()
    owners: dict[str, tuple[str, object]] = {}  # name -> (module, object) bound in the merged namespace
    sections = []
    for module_name in order:
        source = _source(module_name)
        live = vars(source.module)
        drop = []  # statements whose lines leave the body
        kept = []
        for statement in source.tree.body:
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                drop.append(statement)
                if _is_internal(statement):
                    continue
                for alias in statement.names:  # `from m import a` and `from m import b` become one line
                    key = f"from {statement.module}" if isinstance(statement, ast.ImportFrom) else "import"
                    name = alias.name + (f" as {alias.asname}" if alias.asname else "")
                    if name not in imports.setdefault(key, []):
                        imports[key].append(name)
                kept.append(statement)
            elif module_name == target.name and statement is _docstring(source.tree):
                drop.append(statement)  # it opens the file
            elif module_name != target.name and _binds_only(statement, "__all__"):
                drop.append(statement)  # the target's __all__ says what the file exports
            elif ast.dump(statement) in seen_statements:
                drop.append(statement)  # the same statement, already inlined from another module
            else:
                seen_statements.add(ast.dump(statement))
                kept.append(statement)
        for name in _top_level_names(kept) | set(bound_objects[module_name]):
            obj = live.get(name)
            if name in owners and owners[name][1] is not obj:
                raise ValueError(f"cannot write {target.shown_path} as one file: {source.shown_path} and "
                                 f"{_source(owners[name][0]).shown_path} both define {name!r}, differently; "
                                 "rename one of them")
            owners.setdefault(name, (module_name, obj))
        body = _without_lines(source, drop)
        section = [f"# {'-' * 16} {source.shown_path}"] if len(order) > 1 else []
        sections.append("\n".join([*section, *renames.get(module_name, []), body]).strip("\n"))

    header = [f"# Generated by `hfx export --remote-code` (hfx {__version__}) from",
              *(f"#   {_source(name).shown_path}" for name in order),
              "# diffusers downloads a component's or a pipeline's code as one file, so the hfx modules it imports",
              "# are inlined here, each under a line naming its file."]
    stand_in_lines = [f"from torch.nn import Module as {name}  # in annotations only; its code ships with the component"
                      for name in sorted(stand_ins)]
    docstring = ast.get_source_segment(target.text, _docstring(target.tree)) if _docstring(target.tree) else None
    future = [_import_line("from __future__", imports.pop("from __future__"))] if "from __future__" in imports else []
    import_lines = [*(f"import {name}" for name in imports.pop("import", [])),
                    *(_import_line(key, names) for key, names in imports.items())]
    parts = [docstring, "\n".join(header), "\n".join(future), "\n".join(import_lines), "\n".join(stand_in_lines),
             *sections]
    text = "\n\n".join(part for part in parts if part) + "\n"
    _check_one_file(text, target)
    return re.sub(r"\n{4,}", "\n\n\n", text)


def _import_line(key: str, names: list[str]) -> str:
    """``from m import a, b``, wrapped in parentheses when it would pass 120 characters."""
    line = f"{key} import {', '.join(names)}"
    return line if len(line) <= 120 else f"{key} import (\n" + "".join(f"    {name},\n" for name in names) + ")"


def _docstring(tree: ast.Module) -> ast.Expr | None:
    """The statement holding the module's docstring, if it has one."""
    first = tree.body[0] if tree.body else None
    is_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    return first if is_docstring else None


def _binds_only(statement: ast.stmt, name: str) -> bool:
    targets = (statement.targets if isinstance(statement, ast.Assign)
               else [statement.target] if isinstance(statement, (ast.AnnAssign, ast.AugAssign)) else [])
    return bool(targets) and all(isinstance(t, ast.Name) and t.id == name for t in targets)


def _without_lines(source: _Source, statements: list[ast.stmt]) -> str:
    """The module's text without the lines of ``statements`` (whole lines: each must have its own)."""
    lines = source.text.splitlines()
    starts = {id(s): min([s.lineno, *(d.lineno for d in getattr(s, "decorator_list", []))]) for s in source.tree.body}
    body = source.tree.body
    for before, after in zip(body, body[1:]):
        if before.end_lineno >= starts[id(after)] and (before in statements or after in statements):
            raise ValueError(f"{source.shown_path}:{after.lineno}: put each import on its own line for the export")
    removed = {line for s in statements for line in range(starts[id(s)], s.end_lineno + 1)}
    return "\n".join(line for number, line in enumerate(lines, 1) if number not in removed)


def _check_one_file(text: str, target: _Source) -> None:
    """The generated file compiles and imports nothing of this package."""
    tree = ast.parse(text, filename=target.shown_path)
    left = [node for node, _ in _imports_of(tree) if _is_internal(node)]
    if left:
        raise ValueError(f"{target.shown_path}: the one-file export still has `{_describe(left[0])}`")
    compile(tree, target.shown_path, "exec")


def _write_one_file(module_name: str, path: Path) -> str:
    """Write :func:`bundle_module`'s file for ``module_name`` to ``path``; returns the module name diffusers
    records (the file's stem)."""
    from diffusers.utils.dynamic_modules_utils import get_relative_imports

    path.write_text(bundle_module(module_name), encoding="utf-8")
    # diffusers reads "relative imports" with a regex over the whole text, strings included, and would try to
    # copy such files: none may be found in a file that ships alone.
    found = get_relative_imports(str(path))
    if found:
        raise ValueError(f"{_source(module_name).shown_path}: diffusers reads `.{found[0]}` in it as a relative "
                         "import (a line starting with `from .` or `import .`, maybe in a docstring)")
    return path.stem
