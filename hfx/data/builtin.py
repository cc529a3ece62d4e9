"""Datasets that exist on every machine, with no download: the sklearn digits and the Python stdlib
(its source text, and its docstrings labelled by package).

All return a :class:`datasets.DatasetDict` with deterministic ``train`` and ``test`` splits, so a recipe
run anywhere sees the same examples in the same splits.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
import tokenize
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

DIGIT_NAMES = [str(i) for i in range(10)]

# Folders of the stdlib that hold test fixtures, generated tables or vendored packages rather than
# the library's own code: excluded so the corpus is the real, idiomatic source.
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                         "lib2to3", "ensurepip", "pydoc_data"}


def digits(image_size: int = 16, test_size: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """The 1,797 labelled 8x8 sklearn digits as greyscale images.

    Args:
        image_size: side of the square output images; the 8x8 originals are resized with bilinear
            interpolation (8 keeps them unchanged).
        test_size: fraction of each class held out as ``test`` (stratified, so both splits keep the
            class balance).
        seed: seed of the split; the same seed gives the same split on every machine.

    Returns:
        ``DatasetDict(train, test)`` with columns ``image`` (PIL, mode ``"L"``, values 0..255) and
        ``label`` (``ClassLabel`` with names ``"0"``..``"9"``). Every original image is in exactly one split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}")
    bunch = load_digits()
    # The originals hold integers 0..16; 255/16 maps them exactly onto 0..255.
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    order = np.arange(len(labels))
    train_idx, test_idx = train_test_split(order, test_size=test_size, random_state=seed, stratify=labels)

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES)})

    def split(indices: np.ndarray) -> datasets.Dataset:
        indices = np.sort(indices)
        images = [_to_pil(pixels[i], image_size) for i in indices]
        return datasets.Dataset.from_dict(
            {"image": images, "label": labels[indices].tolist()}, features=features,
            info=datasets.DatasetInfo(description=f"sklearn digits at {image_size}x{image_size}, split seed {seed}",
                                      features=features),
        )

    return datasets.DatasetDict(train=split(train_idx), test=split(test_idx))


STROKE_DOMAINS = ["thin", "thick"]


def digits_strokes(image_size: int = 32, test_size: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """Two unpaired image domains made from the sklearn digits: thin strokes and thick strokes (CycleGAN's data).

    Each 8x8 original is upscaled (bicubic) to ``image_size`` and then eroded (``thin``) or dilated (``thick``)
    with a grey-level morphology of side ``max(2, image_size // 8)`` (one original pixel). The two domains are
    built from DIFFERENT digits: within each class of each split, the originals alternate between the domains,
    so no digit appears in both and each domain keeps the class balance. The domain is measurable: the mean
    distance of ink to background, :func:`hfx.metrics.stroke_width`, separates the two (at 32x32, 98-99 % of
    thin and 100 % of thick images fall on their side of the midpoint of the two medians).

    Args:
        image_size: side of the square images (>= 8).
        test_size, seed: the stratified split of the originals, as in :func:`digits` (the same split).

    Returns:
        ``DatasetDict(train, test)`` with columns ``image`` (PIL ``"L"``), ``label`` (the digit, ``ClassLabel``
        ``"0"``..``"9"``), ``domain`` (``ClassLabel`` ``"thin"``, ``"thick"``) and ``source`` (the index of the
        original in ``sklearn.datasets.load_digits()``: each occurs once in the whole dataset).
    """
    from scipy import ndimage
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}")
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_size, random_state=seed,
                                           stratify=labels)
    side = max(2, image_size // 8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES),
                                  "domain": datasets.ClassLabel(names=STROKE_DOMAINS), "source": datasets.Value("int64")})

    def split(indices: np.ndarray) -> datasets.Dataset:
        indices = np.sort(indices)
        images, domains, seen = [], [], np.zeros(len(DIGIT_NAMES), dtype=np.int64)
        for i in indices:
            domain = int(seen[labels[i]] % 2)  # the originals of each class alternate between the domains
            seen[labels[i]] += 1
            base = np.asarray(Image.fromarray(pixels[i], mode="L").resize((image_size, image_size),
                                                                          Image.Resampling.BICUBIC))
            morph = ndimage.grey_dilation if domain else ndimage.grey_erosion
            images.append(Image.fromarray(morph(base, size=(side, side)).astype(np.uint8), mode="L"))
            domains.append(domain)
        return datasets.Dataset.from_dict(
            {"image": images, "label": labels[indices].tolist(), "domain": domains, "source": indices.tolist()},
            features=features,
            info=datasets.DatasetInfo(description=f"sklearn digits at {image_size}x{image_size} in two stroke domains "
                                                  f"(erosion / dilation of side {side}), split seed {seed}",
                                      features=features))

    return datasets.DatasetDict(train=split(train_idx), test=split(test_idx))


def _to_pil(pixels: np.ndarray, image_size: int) -> Image.Image:
    image = Image.fromarray(pixels, mode="L")
    if image_size != pixels.shape[0]:
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return image


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The running interpreter's standard library ``.py`` files, sorted by path relative to the stdlib
    root (so the selection is the same on every machine with the same Python), test folders excluded.
    ``max_files`` keeps an evenly spaced subset of that order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not _STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if max_files is not None:
        if max_files < 1:
            raise ValueError(f"max_files must be >= 1, got {max_files}")
        if max_files < len(files):
            picks = np.linspace(0, len(files) - 1, max_files).round().astype(int)
            files = [files[i] for i in picks]
    return files


def stdlib_text(
    max_files: int | None = None,
    chunk_chars: int | None = None,
    min_chars: int = 200,
    test_percent: float = 5.0,
) -> datasets.DatasetDict:
    """Real Python source text: the standard library of the running interpreter.

    Args:
        max_files: keep an evenly spaced subset of this many files (``None``: all of them, about 600).
        chunk_chars: split each file into pieces of at most this many characters, cut at line ends
            (``None``: one example per file).
        min_chars: drop files (and trailing chunks) shorter than this.
        test_percent: share of FILES held out as ``test``. A file's split depends only on a hash of its
            relative path, so adding or removing other files never moves it.

    Returns:
        ``DatasetDict(train, test)`` with columns ``text`` and ``path`` (relative to the stdlib root).
        The Python version is recorded in each split's ``info.description``.
    """
    if chunk_chars is not None and chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    if not 0.0 < test_percent < 100.0:
        raise ValueError(f"test_percent must be in (0, 100), got {test_percent}")
    root = Path(sysconfig.get_paths()["stdlib"])
    rows: dict[str, dict[str, list[str]]] = {"train": {"text": [], "path": []}, "test": {"text": [], "path": []}}
    for path in stdlib_files(max_files):
        try:
            with tokenize.open(path) as handle:  # honours the file's encoding declaration
                text = handle.read()
        except (SyntaxError, UnicodeDecodeError):
            continue
        rel = path.relative_to(root).as_posix()
        bucket = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 10_000
        split = "test" if bucket < test_percent * 100 else "train"
        for piece in _chunks(text, chunk_chars):
            if len(piece) >= min_chars:
                rows[split]["text"].append(piece)
                rows[split]["path"].append(rel)
    version = ".".join(map(str, sys.version_info[:3]))
    info = f"CPython {version} standard library source ({root})"
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(cols, info=datasets.DatasetInfo(description=info)) for name, cols in rows.items()}
    )


def _chunks(text: str, chunk_chars: int | None) -> list[str]:
    if chunk_chars is None or len(text) <= chunk_chars:
        return [text]
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:  # a single over-long line: hard cut
            if current:
                pieces.append("".join(current))
                current, size = [], 0
            pieces.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if size + len(line) > chunk_chars and current:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return pieces


#: The ten stdlib packages of ``stdlib-docstrings``: the largest pure-Python packages that every CPython 3.10+
#: ships in its core (tkinter / idlelib / turtle are left out: some distributions package them apart; distutils
#: is gone from 3.12).
DOCSTRING_PACKAGES = ("asyncio", "email", "importlib", "logging", "xml", "multiprocessing", "unittest", "http",
                      "urllib", "wsgiref")


def stdlib_docstrings(packages: list[str] | tuple[str, ...] = DOCSTRING_PACKAGES, min_chars: int = 40,
                      test_percent: float = 20.0) -> datasets.DatasetDict:
    """Real labelled text: the docstrings of the standard library's modules, classes and functions, each
    labelled by the top-level package it is in (a 10-way text classification task by default).

    Docstrings are read with :mod:`ast` (nothing is imported) and cleaned with :func:`inspect.cleandoc`. A
    text that occurs in two packages is dropped (it cannot be classified); repeats within a package are kept
    once. A docstring's split depends only on a hash of its text, so the same text is in the same split
    on every machine and in every Python version that has it.

    Args:
        packages: the top-level stdlib packages (folders) that are the classes, in label order.
        min_chars: drop docstrings shorter than this (``"Return self."``).
        test_percent: share of the docstrings held out as ``test``.

    Returns:
        ``DatasetDict(train, test)`` with columns ``text``, ``label`` (``ClassLabel`` named by the packages)
        and ``source`` (``path:qualified name``), sorted by source. The Python version and each split's
        label counts are in its ``info.description``.
    """
    if isinstance(packages, str) or not packages or not all(isinstance(p, str) for p in packages):
        raise ValueError(f"packages must be a list of stdlib package names, got {packages!r}")
    if len(set(packages)) != len(packages):
        raise ValueError(f"packages lists a package twice: {list(packages)}")
    if not isinstance(min_chars, int) or min_chars < 1:
        raise ValueError(f"min_chars must be a positive int, got {min_chars!r}")
    if not 0.0 < test_percent < 100.0:
        raise ValueError(f"test_percent must be in (0, 100), got {test_percent}")
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [p for p in packages if not (root / p / "__init__.py").is_file()]
    if missing:
        raise ValueError(f"packages {missing} are not packages of this Python's standard library ({root})")
    found: dict[str, dict[str, str]] = {}  # text -> {package: first source}
    for path in stdlib_files():
        rel = path.relative_to(root)
        if rel.parts[0] not in packages:
            continue
        try:
            with tokenize.open(path) as handle:
                tree = ast.parse(handle.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for qualname, text in _docstrings(tree):
            if len(text) >= min_chars:
                found.setdefault(text, {}).setdefault(rel.parts[0], f"{rel.as_posix()}:{qualname}")
    rows = {"train": [], "test": []}
    for text, where in found.items():
        if len(where) == 1:
            (package, source), = where.items()
            bucket = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 10_000
            rows["test" if bucket < test_percent * 100 else "train"].append((source, text, packages.index(package)))
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(packages)),
                                  "source": datasets.Value("string")})
    version = ".".join(map(str, sys.version_info[:3]))
    splits = {}
    for name, items in rows.items():
        items.sort()
        counts = np.bincount([label for _, _, label in items], minlength=len(packages))
        described = ", ".join(f"{p} {n}" for p, n in zip(packages, counts))
        info = datasets.DatasetInfo(description=f"CPython {version} standard library docstrings by package: {described}",
                                    features=features)
        splits[name] = datasets.Dataset.from_dict({"text": [t for _, t, _ in items], "label": [la for _, _, la in items],
                                                   "source": [s for s, _, _ in items]}, features=features, info=info)
    return datasets.DatasetDict(splits)


def _docstrings(tree: ast.Module):
    """(qualified name, cleaned docstring) of the module and of every class and function in it."""
    import inspect

    stack = [("<module>", tree)]
    while stack:
        name, node = stack.pop()
        doc = ast.get_docstring(node, clean=False)
        if doc:
            yield name, inspect.cleandoc(doc)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                prefix = "" if name == "<module>" else name + "."
                stack.append((prefix + child.name, child))


BUILTIN_DATASETS = {"digits": digits, "digits-strokes": digits_strokes, "stdlib-text": stdlib_text,
                    "stdlib-docstrings": stdlib_docstrings}


def builtin_dataset(name: str, **options) -> datasets.DatasetDict:
    """Load an embedded dataset by name (see :data:`BUILTIN_DATASETS`); ``options`` go to its builder.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names) or an option the dataset
            does not take (the message lists those it does).
    """
    import inspect

    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; valid names: {', '.join(sorted(BUILTIN_DATASETS))}")
    builder = BUILTIN_DATASETS[name]
    accepted = list(inspect.signature(builder).parameters)
    bad = [key for key in options if key not in accepted]
    if bad:
        raise ValueError(f"built-in dataset {name!r} has no option {', '.join(map(repr, bad))}; its options: {', '.join(accepted)}")
    return builder(**options)
