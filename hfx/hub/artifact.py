"""What an "output folder" is, for ``hfx card``, ``hfx push`` and ``hfx export``.

Two shapes are accepted:

- a **run folder**, written by ``hfx train``: ``final/`` (the artifact), ``config.yaml`` (the resolved
  recipe), ``metrics.jsonl`` (the curves), ``results.json`` (the final evaluation), ``logs/``
  (TensorBoard) and ``checkpoint-<step>/`` (resumable training state);
- a bare **artifact folder**, written by ``save_pretrained``: the contents of a ``final/``.

The artifact's kind comes from the file ``save_pretrained`` writes: ``model_index.json`` for a diffusers
pipeline, ``adapter_config.json`` for a PEFT adapter, ``config.json`` for a transformers model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path

# Training state, never part of a published artifact unless asked for: accelerate's save_state files,
# TensorBoard logs, interrupted writes.
TRAINING_STATE_PATTERNS = (
    "checkpoint-*", "*/checkpoint-*", "logs/*", "runs/*", "*.tmp", "*.tmp/*", "optimizer*", "*/optimizer*",
    "scheduler.bin", "scaler.pt", "random_states_*", "*.pkl", "events.out.tfevents.*", "*/events.out.tfevents.*",
    "training_args.bin", "__pycache__/*", "*/__pycache__/*", "*.pyc",
)
# Kept beside a card for re-rendering it (hfx.hub.cards), never uploaded.
NOT_UPLOADED = (*TRAINING_STATE_PATTERNS, ".hfx-card.json", "README.md.tmp")

KINDS = ("pipeline", "adapter", "model")

# transformers Auto class by the suffix of a model class name; AutoModel for anything else.
_AUTO_BY_SUFFIX = (("ForCausalLM", "AutoModelForCausalLM"), ("ForImageClassification", "AutoModelForImageClassification"),
                   ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                   ("ForMaskedLM", "AutoModelForMaskedLM"))


def auto_class_name(model_class_name: str | None) -> str:
    """The transformers Auto class that loads a model class (``LlamaForCausalLM`` -> ``AutoModelForCausalLM``)."""
    return next((auto for suffix, auto in _AUTO_BY_SUFFIX if (model_class_name or "").endswith(suffix)), "AutoModel")


@dataclasses.dataclass(frozen=True)
class Output:
    """A resolved output folder.

    Attributes:
        artifact_dir: the folder ``from_pretrained`` loads (``run_dir / "final"`` for a run).
        run_dir: the run folder, or ``None`` for a bare artifact folder.
        kind: ``"pipeline"``, ``"adapter"`` or ``"model"``.
    """

    artifact_dir: Path
    run_dir: Path | None
    kind: str

    @property
    def config(self) -> dict:
        """The artifact's own config (``model_index.json``, ``adapter_config.json`` or ``config.json``)."""
        name = {"pipeline": "model_index.json", "adapter": "adapter_config.json", "model": "config.json"}[self.kind]
        return json.loads((self.artifact_dir / name).read_text())

    def run_file(self, name: str) -> Path | None:
        """A file of the run folder (``config.yaml``, ``metrics.jsonl``, ...) when it exists."""
        if self.run_dir is None or not (self.run_dir / name).is_file():
            return None
        return self.run_dir / name


def artifact_kind(folder: Path) -> str | None:
    """``"pipeline"``, ``"adapter"``, ``"model"``, or ``None`` when ``folder`` holds no saved artifact."""
    for kind, marker in (("pipeline", "model_index.json"), ("adapter", "adapter_config.json"), ("model", "config.json")):
        if (folder / marker).is_file():
            return kind
    return None


def resolve_output(output_dir: str | Path) -> Output:
    """Find the artifact of a run folder or a bare artifact folder.

    Raises:
        FileNotFoundError: the folder does not exist, or holds neither ``final/`` with an artifact nor an
            artifact itself (the message says what it looked for).
    """
    folder = Path(output_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {str(folder)!r} does not exist")
    final = folder / "final"
    if final.is_dir():
        kind = artifact_kind(final)
        if kind is None:
            raise FileNotFoundError(f"{final} holds no saved artifact (no model_index.json, adapter_config.json "
                                    "or config.json): did the run finish?")
        return Output(final.resolve(), folder.resolve(), kind)
    kind = artifact_kind(folder)
    if kind is None:
        has_checkpoints = any(folder.glob("checkpoint-*"))
        hint = (" It has checkpoint-* folders but no final/: the run did not finish (resume it with hfx train)."
                if has_checkpoints else "")
        raise FileNotFoundError(f"{folder} is neither a run folder (with final/) nor a saved artifact "
                                f"(model_index.json, adapter_config.json or config.json).{hint}")
    # A bare artifact may still sit inside a run folder (someone passed run/final).
    parent = folder.resolve().parent
    run_dir = parent if folder.name == "final" and (parent / "config.yaml").is_file() else None
    return Output(folder.resolve(), run_dir, kind)


def is_training_state(relative_path: str) -> bool:
    """True for files that are not part of a published artifact (see :data:`NOT_UPLOADED`)."""
    return any(fnmatch.fnmatch(relative_path, pattern) for pattern in NOT_UPLOADED)


def artifact_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the files under ``folder`` that belong to the artifact, sorted."""
    return sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*")
        if path.is_file() and not is_training_state(path.relative_to(folder).as_posix())
    )
