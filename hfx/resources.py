"""Where the shipped recipes (``training/``) and card templates (``hub_cards/``) live.

In a checkout (and an editable install) they sit at the top of the repository; a wheel carries them
inside the package as ``hfx/_resources/<name>/``. :func:`resource_path` hides the difference.
"""

from __future__ import annotations

from pathlib import Path

RESOURCE_DIRS = ("training", "hub_cards")

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Return the folder of a shipped resource kind: ``"training"`` or ``"hub_cards"``.

    Raises:
        ValueError: ``name`` is not one of :data:`RESOURCE_DIRS`.
        FileNotFoundError: the installation carries no such folder (a broken install).
    """
    if name not in RESOURCE_DIRS:
        raise ValueError(f"unknown resource folder {name!r}; valid names: {', '.join(RESOURCE_DIRS)}")
    for candidate in (_PACKAGE_DIR / "_resources" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"hfx's {name}/ folder is missing from this installation (looked in "
        f"{_PACKAGE_DIR / '_resources' / name} and {_PACKAGE_DIR.parent / name}); reinstall hfx"
    )


def resource_path(name: str, *parts: str) -> Path:
    """Path of a file inside a shipped resource folder, e.g. ``resource_path("training", "configs",
    "classify-digits.yaml")``. Raises FileNotFoundError naming the file and what exists beside it."""
    path = resource_dir(name).joinpath(*parts)
    if not path.exists():
        parent = path.parent
        siblings = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
        raise FileNotFoundError(f"{path} does not exist; {parent} holds: {', '.join(siblings) or 'nothing'}")
    return path


def training_config(name: str) -> Path:
    """Resolve a recipe given as a path or as a shipped recipe name (``"classify-digits"``)."""
    as_path = Path(name)
    if as_path.is_file():
        return as_path
    if as_path.is_dir():
        raise ValueError(f"recipe {name!r} is a folder; give a YAML file or a shipped recipe name")
    stem = as_path.name[:-5] if as_path.name.endswith(".yaml") else as_path.name
    configs = resource_dir("training") / "configs"
    candidate = configs / f"{stem}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in configs.glob("*.yaml"))
    raise FileNotFoundError(
        f"no config file {name!r} and no shipped recipe of that name; shipped recipes: {', '.join(known) or 'none'}"
    )
