"""Checkpoint folders: ``output_dir/checkpoint-<step>/``, written as ``checkpoint-<step>.tmp`` and renamed
when complete, so a run killed while saving never leaves a folder that resume would pick up."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: Written last into every checkpoint; its presence marks a complete one.
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in ``output_dir``, oldest (lowest step) first; ``.tmp`` folders and
    folders without :data:`STATE_FILE` are ignored."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


#: What a finished or interrupted run leaves in its output folder (config.yaml is rewritten by every run).
RUN_FILES = ("checkpoint-*", "final", "final.tmp", "metrics.jsonl", "results.json", "logs", "tokenizer",
             "warm_base")


def previous_run_files(output_dir: str | Path) -> list[str]:
    """Names of a previous run's files in ``output_dir`` (empty for a new or empty folder)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted({p.name for pattern in RUN_FILES for p in output_dir.glob(pattern)})


def clear_previous_run(output_dir: str | Path) -> None:
    """Delete what :func:`previous_run_files` lists (main process, before a run starts over)."""
    for name in previous_run_files(output_dir):
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def resolve_checkpoint(spec: str | None, output_dir: str | Path) -> Path | None:
    """``None`` -> None; ``"latest"`` -> the newest complete checkpoint in ``output_dir`` (None when there
    is none, so a re-queued job starts fresh); anything else -> that folder.

    Raises:
        FileNotFoundError: a path that is not a complete checkpoint folder.
    """
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        what = "is incomplete (no trainer_state.json)" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"resume_from_checkpoint: {spec} {what}")
    return path


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}.tmp"


def commit(tmp_dir: Path, state: dict) -> Path:
    """Write the state file into ``tmp_dir`` and rename it to its final name (replacing an older folder
    of the same step). Main process only."""
    (tmp_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    final = tmp_dir.with_name(tmp_dir.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    return final


def prune(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``total_limit``, and leftover ``.tmp`` folders of
    killed saves. Returns the deleted folders."""
    deleted = []
    for tmp in Path(output_dir).glob("checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        deleted.append(tmp)
    if total_limit is not None:
        for path in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(path)
            deleted.append(path)
    return deleted
