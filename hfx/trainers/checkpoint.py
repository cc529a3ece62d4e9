"""The run folder on disk: which files are hfx's, and checkpoint folders that are complete or not used.

**Whose files.** The first run in an ``output_dir`` writes :data:`RUN_MARKER`, which lists what the folder
held before hfx came (``foreign``). hfx deletes (``overwrite_output_dir``, pruning) only entries of
:data:`RUN_FILES` that are not foreign, and refuses to start in a folder whose foreign entries a run would
write into. A folder of an earlier hfx without the marker is recognised by its ``config.yaml``.

**Checkpoints.** ``output_dir/checkpoint-<step>/`` is written as ``checkpoint-<step>.tmp`` and renamed when
complete. :data:`STATE_FILE` is written last and lists every file of the folder with its size (and, below
:data:`HASHED_BELOW` bytes, its SHA-256): a checkpoint is complete only when every listed file is there,
unchanged. ``latest`` takes the newest complete checkpoint and says loudly which incomplete ones it passed
over; an explicit path must be complete.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from hfx.trainers.errors import ConfigError, ResumeError

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: Written last into every checkpoint; its presence marks a complete one.
STATE_FILE = "trainer_state.json"
#: Files smaller than this get a SHA-256 in the state file (bigger ones: their size), checked on resume.
HASHED_BELOW = 64 * 2**20
#: Written by the first run in a folder: what the folder held before (never deleted or written by hfx).
RUN_MARKER = ".hfx-run.json"
#: What a run writes at the top of its output folder.
RUN_FILES = ("checkpoint-*", "final", "final.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "results.json", "logs",
             "tokenizer", "base", "base.tmp", "warm_base", "warm_base.tmp", "samples", "config.yaml", RUN_MARKER)


# ---------------------------------------------------------------------------------------------- whose files
def _is_run_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in RUN_FILES)


def _marker(output_dir: Path) -> dict | None:
    path = output_dir / RUN_MARKER
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path} cannot be read ({err}): delete it only if the folder holds no files of yours") from None
    config = output_dir / "config.yaml"
    if config.is_file():  # a run of an hfx without the marker: its run files are hfx's
        import yaml

        try:
            saved = yaml.safe_load(config.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            saved = None
        if isinstance(saved, dict) and "task" in saved and "output_dir" in saved:
            return {"foreign": []}
    if list_checkpoints(output_dir):  # checkpoints hfx wrote (a run of an earlier hfx, or copied here to resume)
        return {"foreign": []}
    return None


def check_output_dir(output_dir: str | Path) -> None:
    """Raise a ConfigError naming the path when ``output_dir`` cannot hold a run: a file, a folder under a
    file, or a folder not made by hfx that holds entries a run would write (``logs``, ``results.json``...)."""
    output_dir = Path(output_dir)
    for parent in [output_dir, *output_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == output_dir else f"is under {parent}, which is a file"
                raise ConfigError(f"output_dir {str(output_dir)!r} {what}; give a folder")
            break
    if not output_dir.is_dir():
        return
    if _marker(output_dir) is None:
        clashes = sorted(p.name for p in output_dir.iterdir() if _is_run_file(p.name))
        if clashes:
            raise ConfigError(f"output_dir {output_dir} holds {', '.join(clashes)}, which hfx did not write and a run "
                              "would write into: choose another output_dir")


def claim_output_dir(output_dir: str | Path) -> None:
    """Create ``output_dir`` if needed and write :data:`RUN_MARKER` (once), recording what it held before."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if _marker(output_dir) is None:
        foreign = sorted(p.name for p in output_dir.iterdir())
        (output_dir / RUN_MARKER).write_text(json.dumps({"foreign": foreign}, indent=2))


def previous_run_files(output_dir: str | Path) -> list[str]:
    """Names of the files an earlier hfx run wrote in ``output_dir`` (empty for a new or foreign folder)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    marker = _marker(output_dir)
    if marker is None:
        return []
    foreign = set(marker.get("foreign", []))
    # config.yaml and the marker are rewritten by every run: alone they are no run to continue or lose.
    return sorted(p.name for p in output_dir.iterdir()
                  if _is_run_file(p.name) and p.name not in foreign and p.name not in (RUN_MARKER, "config.yaml"))


def clear_previous_run(output_dir: str | Path) -> None:
    """Delete what :func:`previous_run_files` lists (main process, before a run starts over)."""
    for name in previous_run_files(output_dir):
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


# ---------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders with a state file in ``output_dir``, oldest (lowest step) first (``.tmp`` folders
    are ignored; completeness is :func:`missing_files`'s)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def read_state(path: Path) -> dict[str, Any]:
    """The state file of a checkpoint, in the current layout (``counters``, ``files``, ...); a checkpoint
    of an earlier hfx (the counters alone) comes back with ``files`` None."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ResumeError(f"{path / STATE_FILE} cannot be read: {err}") from None
    if "counters" not in state:
        state = {"counters": state, "files": None}
    return state


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            sha.update(block)
    return sha.hexdigest()


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` (the state file excepted): its size and, when small, its SHA-256."""
    manifest = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != STATE_FILE:
            size = path.stat().st_size
            entry: dict[str, Any] = {"size": size}
            if size < HASHED_BELOW:
                entry["sha256"] = _digest(path)
            manifest[path.relative_to(folder).as_posix()] = entry
    return manifest


def missing_files(path: Path, num_processes: int = 1) -> list[str]:
    """What makes checkpoint ``path`` incomplete: listed files that are missing, unreadable, truncated or
    changed (an empty list for a complete checkpoint). A checkpoint of an earlier hfx lists no files: then
    the random state of every process and the engine state must at least be there."""
    state = read_state(path)
    files = state.get("files")
    if files is None:
        needed = ["engine_state.pt", *(f"random_states_{i}.pkl" for i in range(num_processes))]
        return [f"{name} (missing)" for name in needed if not (path / name).is_file()]
    problems = []
    for name, entry in files.items():
        file = path / name
        try:
            size = file.stat().st_size
            if size != entry["size"]:
                problems.append(f"{name} (size {size}, written {entry['size']})")
            elif "sha256" in entry and _digest(file) != entry["sha256"]:
                problems.append(f"{name} (content changed)")
        except FileNotFoundError:
            problems.append(f"{name} (missing)")
        except OSError as err:
            problems.append(f"{name} (unreadable: {err.strerror or err})")
    return problems


def resolve_checkpoint(spec: str | None, output_dir: str | Path, num_processes: int = 1) -> Path | None:
    """``None`` -> None; ``"latest"`` -> the newest complete checkpoint in ``output_dir`` (incomplete newer
    ones are named in a warning; None when there is none); a path -> that folder, which must be complete.

    Raises:
        FileNotFoundError: a path that is not a checkpoint folder.
        ResumeError: a path to an incomplete checkpoint (the message names what is wrong).
    """
    if spec is None:
        return None
    if spec == "latest":
        for path in reversed(list_checkpoints(output_dir)):
            problems = missing_files(path, num_processes)
            if not problems:
                return path
            logger.warning("resume_from_checkpoint=latest: %s is incomplete (%s); trying the one before", path,
                           "; ".join(problems[:3]))
        return None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        what = "is incomplete (no trainer_state.json)" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"resume_from_checkpoint: {spec} {what}")
    problems = missing_files(path, num_processes)
    if problems:
        raise ResumeError(f"resume_from_checkpoint: {spec} is incomplete: {'; '.join(problems[:3])}")
    return path


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}.tmp"


def commit(tmp_dir: Path, state: dict[str, Any]) -> Path:
    """Write the state file (with the manifest of ``tmp_dir``'s files) and rename the folder to its final
    name, replacing an older folder of the same step. Main process only."""
    state = {**state, "files": file_manifest(tmp_dir)}
    (tmp_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    final = tmp_dir.with_name(tmp_dir.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    return final


def prune(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``total_limit``, and leftover ``.tmp`` folders of killed saves.
    Returns the deleted folders."""
    deleted = []
    for tmp in Path(output_dir).glob("checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        deleted.append(tmp)
    if total_limit is not None:
        for path in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(path)
            deleted.append(path)
    return deleted
