"""Writing a Space folder (``app.py``, ``requirements.txt``, ``README.md`` with the Spaces front matter, the
artifact in ``model/``) and pushing it (:func:`hfx.hub.publish.push_files`, the code behind ``hfx push``).

``hfx space`` never deletes a file it did not write: the folder's ``.hfx-space.json`` lists every file it
wrote with its sha256, and writing into a folder that holds anything else (or a listed file edited since)
is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

from hfx.space.kinds import SPACE_KINDS, Artifact, SpaceApp, detect_kind

MANIFEST = ".hfx-space.json"
MODEL_DIR = "model"
#: The JSON files (and the card) that say what a repo holds: all ``hfx space REPO_ID`` downloads to choose the app.
_DESCRIBING = ["model_index.json", "config.json", "adapter_config.json", "hfx_preprocessing.json", "README.md",
               "*/config.json"]

_HEADER = '''"""{title}: a Gradio app written by `hfx space` (hfx {version}) for the artifact
{where}.

`python app.py` serves it on http://127.0.0.1:7860 (GRADIO_SERVER_NAME and GRADIO_SERVER_PORT change that); on
Hugging Face Spaces it starts by itself. Every button is also an API endpoint: see "Use via API" at the bottom
of the page, or `gradio_client.Client(url).view_api()`. Endpoints: {endpoints}.
"""

{imports}

MODEL = artifact_folder({model!r}, __file__)  # {model_comment}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TITLE = {title!r}
DESCRIPTION = """{description}"""
PIXELS = "hfx-pixels"  # small images (8x8 .. 64x64 digits) shown large and unsmoothed
CSS = ".hfx-pixels img {{ image-rendering: pixelated; }}"
'''

_FOOTER = '''

if __name__ == "__main__":
    demo.launch(css=CSS)
'''


def render_app(app: SpaceApp, model: str, where: str) -> str:
    """The source of ``app.py``: the common header (``MODEL`` = ``model``, a folder beside the app or a repo
    id), the kind's body, the launch."""
    from hfx import __version__

    local = model == MODEL_DIR
    description = "\n\n".join([f"## {app.title}", textwrap.fill(app.summary, 110), f"The artifact: {where}."])
    description = description.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    imports, body = _hoist_imports(textwrap.dedent(app.body).strip("\n"))
    header = _HEADER.format(
        title=app.title, where=where, version=__version__, endpoints=", ".join(f"/{e}" for e in app.endpoints),
        model=model, description=description, imports=imports,
        model_comment="the artifact copied beside this file" if local else "a Hub repo id: downloaded at start")
    return header + "\n" + body + "\n" + _FOOTER


#: The imports of every app; ``import hfx`` must come before any model is loaded.
_COMMON_IMPORTS = ("import gradio as gr", "import torch", "import hfx", "from hfx.space.runtime import artifact_folder")


def _hoist_imports(body: str) -> tuple[str, str]:
    """``(imports, rest)``: the body's leading imports merged with :data:`_COMMON_IMPORTS`, one ``from`` line per
    module, third-party packages first and hfx second (isort's order), and the rest of the body."""
    import ast

    tree = ast.parse(body)
    lines = body.splitlines()
    leading = []
    for node in tree.body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        leading.append(node)
    rest = "\n".join(lines[leading[-1].end_lineno:]).strip("\n") if leading else body
    plain, named = set(), {}
    for node in [*ast.parse("\n".join(_COMMON_IMPORTS)).body, *leading]:
        for alias in node.names:
            text = alias.name + (f" as {alias.asname}" if alias.asname else "")
            if isinstance(node, ast.Import):
                plain.add(text)
            else:
                named.setdefault(node.module, set()).add(text)
    groups: dict[bool, list[str]] = {False: [], True: []}
    for text in sorted(plain, key=str.lower):
        groups[text.split(".")[0].split(" ")[0] == "hfx"].append(
            f"import {text}" + ("  # noqa: F401  (registers hfx's models and pipelines with transformers and diffusers)"
                               if text == "hfx" else ""))
    for module in sorted(named, key=str.lower):
        groups[module.split(".")[0] == "hfx"].append(f"from {module} import {', '.join(sorted(named[module]))}")
    return "\n\n".join("\n".join(group) for group in groups.values() if group), rest


def requirements() -> str:
    """``requirements.txt``: hfx (which brings torch, diffusers, transformers, peft, timm) and this gradio."""
    from importlib import metadata

    from hfx import __version__

    return (f"# What the Space installs with pip on top of its Python; see README.md.\n"
            f"hfx=={__version__}\ngradio=={metadata.version('gradio')}\n")


def readme(app: SpaceApp, where: str, repo_id: str | None) -> str:
    """The Space's ``README.md``: the Spaces front matter (``sdk: gradio``) and how the Space runs."""
    from importlib import metadata

    from hfx import __version__

    front = ["---", f"title: {json.dumps(app.title)}", f"emoji: {app.emoji}", "colorFrom: indigo", "colorTo: gray",
             "sdk: gradio", f"sdk_version: {metadata.version('gradio')}", "python_version: \"3.11\"", "app_file: app.py",
             "pinned: false", "license: apache-2.0", "tags:", "- hfx", f"- {app.kind}"]
    if repo_id is not None:
        front += ["models:", f"- {repo_id}"]
    endpoints = "\n".join(f"- `/{name}`" for name in app.endpoints)
    return "\n".join(front + ["---", "", f"# {app.title}", "", f"{app.summary} The artifact: {where}.", "",
                              "## How this Space runs", "",
                              f"`app.py` is a plain Gradio app written by `hfx space` (hfx {__version__}). It needs "
                              "hfx, which registers hfx's models and pipelines with transformers and diffusers: the "
                              f"Space installs it from `requirements.txt` (`hfx=={__version__}`, which brings torch, "
                              "diffusers, transformers, peft and timm). Where that version is not on PyPI, replace "
                              "the line with where hfx comes from, e.g. `hfx @ git+https://github.com/<owner>/hfx@<tag>` "
                              "or a wheel committed beside the app (`./hfx-<version>-py3-none-any.whl`).", "",
                              "Locally: `pip install -r requirements.txt && python app.py`, then open "
                              "http://127.0.0.1:7860.", "", "## API", "",
                              "Every button is an endpoint of the Gradio API (`gradio_client.Client(url).predict(..., "
                              "api_name=\"/<name>\")`):", "", endpoints, ""])


# ---------------------------------------------------------------------------------------------- sources
def resolve_source(source: str | Path) -> tuple[Artifact, str | None, Path | None]:
    """``(artifact, repo_id, local_artifact_dir)`` of ``hfx space``'s argument: a run folder, a saved artifact
    folder, or a Hub repo id (then only the files that describe it are downloaded, and the app loads the repo).

    Raises:
        FileNotFoundError: a path that is neither a folder nor a repo id, or a folder with no artifact.
        NotADirectoryError: a file where the folder goes.
        ValueError: an artifact with no app yet.
    """
    from hfx.hub.artifact import resolve_output

    path = Path(source).expanduser()
    if path.is_file():
        raise NotADirectoryError(f"{source} is a file: give a run folder, a saved artifact folder or a Hub repo id")
    if path.is_dir():
        output = resolve_output(path)
        return detect_kind(output.artifact_dir), None, output.artifact_dir
    repo_id = str(source)
    if not _looks_like_repo_id(repo_id):
        raise FileNotFoundError(f"{source} does not exist (and is not a Hub repo id user/name)")
    return detect_kind(_describing_files(repo_id)), repo_id, None


def _looks_like_repo_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return text.count("/") == 1 and not text.startswith((".", "~"))


def _describing_files(repo_id: str) -> Path:
    """A local folder with the repo's JSON files and card (to choose the app without downloading weights)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_DESCRIBING))
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo_id} is neither a folder here nor a model repo on the Hub") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{repo_id} is not a folder here, and the Hub cannot be reached to look it up "
                                "(offline?)") from None
    except (HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(f"{repo_id} is not a folder here, and reading it from the Hub failed: "
                                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def default_out(source: str | Path, artifact_dir: Path | None) -> Path:
    """Where ``hfx space`` writes by default: ``RUN/space`` for a run folder, ``ARTIFACT-space`` beside a bare
    artifact folder, ``./NAME-space`` for a repo id."""
    if artifact_dir is None:
        return Path(f"{str(source).split('/')[-1]}-space")
    path = Path(source).expanduser()
    if artifact_dir != path.resolve():  # a run folder: the artifact is its final/
        return path / "space"
    return path.parent / f"{path.name}-space"


# ---------------------------------------------------------------------------------------------- writing
def build_space(source: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the Space of ``source`` (see :func:`resolve_source`) into ``out_dir`` (default :func:`default_out`);
    returns the folder."""
    artifact, repo_id, artifact_dir = resolve_source(source)
    app = SPACE_KINDS[artifact.kind](artifact)
    out = Path(out_dir) if out_dir is not None else default_out(source, artifact_dir)
    return write_space(app, out, artifact_dir=artifact_dir, repo_id=repo_id)


def write_space(app: SpaceApp, out_dir: str | Path, *, artifact_dir: Path | None = None,
                repo_id: str | None = None) -> Path:
    """Write ``app.py``, ``requirements.txt`` and ``README.md`` into ``out_dir`` and copy the artifact in
    ``artifact_dir`` (its files, without training state) to ``out_dir/model``, or, with ``repo_id`` alone,
    make the app load that repo.

    Raises:
        FileExistsError: ``out_dir`` holds files this function did not write (or edited since); nothing is
            deleted then.
        NotADirectoryError: ``out_dir`` is a file.
    """
    from hfx.hub.artifact import artifact_files

    if (artifact_dir is None) == (repo_id is None):
        raise ValueError("give exactly one of artifact_dir (copied into the Space) and repo_id (loaded from the Hub)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file: give a folder for the Space")
    _remove_earlier_space(out)
    where = f"`{repo_id}` (Hub repo)" if repo_id else f"`{artifact_dir.name}` (copied into `{MODEL_DIR}/`)"
    files = {"app.py": render_app(app, MODEL_DIR if repo_id is None else repo_id, where),
             "requirements.txt": requirements(), "README.md": readme(app, where, repo_id)}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        written.append(name)
    if artifact_dir is not None:
        for relative in artifact_files(artifact_dir):
            target = out / MODEL_DIR / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(artifact_dir / relative, target)
            written.append(f"{MODEL_DIR}/{relative}")
    manifest = {"kind": app.kind, "endpoints": list(app.endpoints), "files": {name: _sha256(out / name) for name in written}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def _remove_earlier_space(out: Path) -> None:
    """Delete what an earlier ``write_space`` wrote into ``out``, after checking that ``out`` holds nothing else."""
    if not out.is_dir():
        return
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink())
    if not present:
        return
    listed = {}
    if (out / MANIFEST).is_file():
        try:
            listed = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError):
            listed = {}
    foreign = [p for p in present if p != MANIFEST and (p not in listed or _sha256(out / p) != listed[p])]
    if foreign or not listed:
        shown = ", ".join(foreign[:3] or present[:3]) + (", ..." if len(foreign or present) > 3 else "")
        raise FileExistsError(f"--out {out} holds files hfx space did not write (or that were edited since): {shown}; "
                              "choose another --out, or move them away")
    for name in listed:
        if (out / name).is_file():
            (out / name).unlink()
    (out / MANIFEST).unlink()
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- pushing
def push_space(space_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
               commit_message: str | None = None) -> str:
    """Upload a folder written by :func:`write_space` as the Gradio Space ``repo_id`` (created if missing), in one
    commit, through the publishing code of ``hfx push``. Returns the commit URL.

    Raises:
        FileNotFoundError: ``space_dir`` was not written by ``hfx space``.
    """
    from hfx.hub.publish import push_files

    folder = Path(space_dir)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is not a Space written by hfx space (no {MANIFEST})")
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    files = {name: folder / name for name in manifest["files"]}
    return push_files(files, repo_id, repo_type="space", space_sdk="gradio", private=private, token=token,
                      commit_message=commit_message or f"Upload the {manifest['kind']} Space with hfx space")

