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


# ------------------------------------------------------------------------------------- digits-captions
#: The attributes of ``digits-captions``, each with its value names in id order (the order of the ClassLabels
#: and of :data:`hfx.metrics.DIGIT_ATTRIBUTES`, which measures them).
CAPTION_ATTRIBUTES = {"size": ("small", "large"), "position": ("left", "right"), "thickness": ("thin", "thick")}

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Several phrasings of each attribute value: ``size`` and ``thickness`` as adjectives, ``position`` as a place.
CAPTION_PHRASES = {
    "size": {"small": ("small", "little", "tiny"), "large": ("large", "big", "tall")},
    "thickness": {"thin": ("thin", "fine", "light"), "thick": ("thick", "bold", "heavy")},
    "position": {"left": ("on the left", "in the left half", "on the left side"),
                 "right": ("on the right", "in the right half", "on the right side")},
}

#: Caption templates; ``{numeral}`` is "3", ``{word}`` is "three".
CAPTION_TEMPLATES = (
    "a {size} {thickness} {numeral} {position}",
    "the digit {word}, {size}, drawn with {thickness} strokes, {position}",
    "{position}: a {size} {word} in {thickness} strokes",
    "a {thickness}, {size} number {numeral} {position}",
    "{numeral}, {size}, {thickness}, {position}",
    "a {size} {word} written in {thickness} lines, {position}",
)

#: The attribute combinations that ``digits-captions`` keeps out of ``train``: an example matches one when it
#: has every value the combination names (one without ``label`` holds for every digit).
HELDOUT_COMBINATIONS = (
    {"size": "small", "position": "right", "thickness": "thick"},
    {"label": 3, "size": "large", "position": "left", "thickness": "thin"},
    {"label": 7, "size": "large", "position": "left", "thickness": "thick"},
    {"label": 9, "size": "small", "position": "left", "thickness": "thin"},
)

# How a digit is drawn on a canvas of side C, at C = 32 (all scale with C / 32). hfx.metrics.attributes restates
# these to derive its thresholds; tests/test_digit_captions.py checks the two agree on the real images.
_GLYPH_HEIGHTS = {"small": 12, "large": 20}  # height of the digit's box before the pen
_PEN_RADII = {"thin": 0.8, "thick": 1.9}  # px: strokes about 1.6 and 3.8 px wide
_CANVAS_MARGIN = 1  # px of background kept between the ink and the border
_SKELETON_LEVEL = 128  # of 255: the upscaled digit's shape, whose skeleton is drawn


def caption_for(label: int, attributes: dict[str, str | int], template_index: int = 0,
                phrasing: int | dict[str, int] = 0) -> str:
    """The caption of a digit with these attributes, as ``digits-captions`` writes it (and as a pipeline can
    write prompts of any combination, held-out ones included).

    Args:
        label: the digit, 0..9.
        attributes: every name of :data:`CAPTION_ATTRIBUTES` -> its value, as a name ("small") or an id (0).
        template_index: which of :data:`CAPTION_TEMPLATES` (taken modulo their number).
        phrasing: which phrasing of each value in :data:`CAPTION_PHRASES` (modulo their number): one index
            for every attribute, or a dict attribute -> index (missing ones: 0).

    Returns:
        e.g. ``caption_for(3, {"size": "small", "thickness": "thick", "position": "left"})`` is
        ``"a small thick 3 on the left"``; with ``template_index=1, phrasing={"position": 1}`` it is
        ``"the digit three, small, drawn with thick strokes, in the left half"``.
    """
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label <= 9:
        raise ValueError(f"label must be a digit 0..9, got {label!r}")
    names = _attribute_names(attributes, "attributes")
    missing = [name for name in CAPTION_ATTRIBUTES if name not in names]
    if missing:
        raise ValueError(f"attributes lacks {', '.join(missing)}; a caption names {', '.join(CAPTION_ATTRIBUTES)}")
    picks = phrasing if isinstance(phrasing, dict) else dict.fromkeys(CAPTION_ATTRIBUTES, phrasing)
    phrases = {name: CAPTION_PHRASES[name][value][int(picks.get(name, 0)) % len(CAPTION_PHRASES[name][value])]
               for name, value in names.items()}
    template = CAPTION_TEMPLATES[template_index % len(CAPTION_TEMPLATES)]
    return template.format(numeral=str(int(label)), word=DIGIT_WORDS[label], **phrases)


def _attribute_names(attributes: dict, option: str) -> dict[str, str]:
    """Check ``{attribute: value name or id}`` against :data:`CAPTION_ATTRIBUTES`; -> ``{attribute: value name}``."""
    if not isinstance(attributes, dict):
        raise ValueError(f"{option} must be a dict of attribute -> value, got {attributes!r}")
    names = {}
    for name, value in attributes.items():
        if name not in CAPTION_ATTRIBUTES:
            raise ValueError(f"{option} has an unknown attribute {name!r}; attributes: {', '.join(CAPTION_ATTRIBUTES)}")
        values = CAPTION_ATTRIBUTES[name]
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(values):
            value = values[value]
        if value not in values:
            raise ValueError(f"{option}: {name} {value!r} is not one of {', '.join(values)}")
        names[name] = value
    return names


def digits_captions(canvas_size: int = 32, test_size: float = 0.2, heldout: tuple[dict, ...] = HELDOUT_COMBINATIONS,
                    seed: int = 0) -> datasets.DatasetDict:
    """Captioned digits whose captions name attributes a program can measure (text-to-image data).

    Each sklearn digit is drawn once, on a black ``canvas_size`` canvas: its upscaled shape is thinned to a
    skeleton (Zhang-Suen), the skeleton is fitted to a box 12 (``small``) or 20 (``large``) px high, its centre
    of mass put at a quarter (``left``) or three quarters (``right``) of the width (moved inwards where a large
    digit would come within 1 px of the border), and it is drawn with a round pen: ink within 0.8 (``thin``) or
    1.9 (``thick``) px of the skeleton, then a one-pixel ramp (sizes at 32; all scale with ``canvas_size / 32``).
    A pen rather than :func:`digits_strokes`'s erosion / dilation: at 12 px one erosion erases a stroke, and the
    pen gives every digit and size the same stroke, so thickness and size are measured apart. The functions of
    :mod:`hfx.metrics.attributes` recover each attribute from the pixels (100 % of the images at 32, 48, 64).

    The split of the originals is :func:`digits`'s (same ``test_size`` and ``seed``). The ``test`` originals of
    each class alternate (by source index) between ``test`` and ``heldout`` (all go to ``test`` for a digit
    that no held-out combination names). ``train`` and ``test`` examples get the combinations NOT in
    ``heldout``, ``heldout`` examples only those in it, cycled in a seeded order within each class, so the
    attributes are balanced, no ``train`` image has a held-out combination and no ``heldout`` image is drawn
    from a ``train`` original. Each caption is :func:`caption_for` with a seeded template and phrasings.

    Args:
        canvas_size: side of the square images (>= 24); the drawing scales with it.
        test_size, seed: the stratified split of the originals, as in :func:`digits`; ``seed`` also draws
            the attributes and the captions.
        heldout: the combinations kept out of ``train``: dicts of attribute values (names), optionally with a
            ``label``; default :data:`HELDOUT_COMBINATIONS`. Each digit must keep a combination for ``train``.

    Returns:
        ``DatasetDict(train, test, heldout)`` with columns ``image`` (PIL ``"L"``), ``text`` (the caption),
        ``label`` (``ClassLabel`` "0".."9"), ``size``, ``position``, ``thickness`` (``ClassLabel`` each, names in
        :data:`CAPTION_ATTRIBUTES`) and ``source`` (the index in ``sklearn.datasets.load_digits()``: each once
        in the whole dataset). Each split's ``info.description`` gives the split sizes and the held-out list.
    """
    import itertools

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(canvas_size, bool) or not isinstance(canvas_size, int) or canvas_size < 24:
        raise ValueError(f"canvas_size must be an int >= 24, got {canvas_size!r}")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}")
    held = _heldout_combinations(heldout)
    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_size, random_state=seed,
                                           stratify=labels)
    combos = list(itertools.product(*CAPTION_ATTRIBUTES.values()))  # (size, position, thickness)

    def is_held(label: int, combo: tuple[str, ...]) -> bool:
        values = dict(zip(CAPTION_ATTRIBUTES, combo), label=label)
        return any(all(values[k] == v for k, v in h.items()) for h in held)

    for digit in range(10):
        if all(is_held(digit, c) for c in combos):
            raise ValueError(f"heldout holds out every combination of digit {digit}; train needs at least one")
    role = {int(i): "train" for i in train_idx}
    for digit in range(10):  # within each class, the test originals alternate between test and heldout
        has_heldout = any(is_held(digit, c) for c in combos)
        for k, i in enumerate(np.sort(test_idx[labels[test_idx] == digit])):
            role[int(i)] = "heldout" if has_heldout and k % 2 else "test"
    rng = np.random.default_rng(seed)
    assigned = {}
    for name in ("train", "test", "heldout"):
        for digit in range(10):
            allowed = [c for c in combos if is_held(digit, c) == (name == "heldout")]
            members = sorted(i for i, r in role.items() if r == name and labels[i] == digit)
            order = rng.permutation(len(allowed))
            for k, i in enumerate(rng.permutation(members)):
                assigned[int(i)] = allowed[order[k % len(allowed)]]
    templates = rng.integers(len(CAPTION_TEMPLATES), size=len(labels))
    phrasings = rng.integers(1 << 16, size=(len(labels), len(CAPTION_ATTRIBUTES)))

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=DIGIT_NAMES),
                                  **{name: datasets.ClassLabel(names=list(values))
                                     for name, values in CAPTION_ATTRIBUTES.items()},
                                  "source": datasets.Value("int64")})
    sizes = {name: sum(r == name for r in role.values()) for name in ("train", "test", "heldout")}
    described = "; ".join(", ".join(f"{k}={v}" for k, v in h.items()) for h in held) or "none"
    description = (f"sklearn digits drawn on a {canvas_size}x{canvas_size} canvas with measurable size, position and "
                   f"thickness, captioned by templates; split seed {seed}; {sizes['train']} train, {sizes['test']} test, "
                   f"{sizes['heldout']} heldout; held out of train (heldout only): {described}")
    splits = {}
    for name in ("train", "test", "heldout"):
        indices = sorted(i for i, r in role.items() if r == name)
        rows = {"image": [], "text": [], "label": [], **{a: [] for a in CAPTION_ATTRIBUTES}, "source": indices}
        for i in indices:
            values = dict(zip(CAPTION_ATTRIBUTES, assigned[i]))
            rows["image"].append(_draw_caption_digit(bunch.images[i], canvas_size, **values))
            rows["text"].append(caption_for(int(labels[i]), values, int(templates[i]),
                                            dict(zip(CAPTION_ATTRIBUTES, phrasings[i].tolist()))))
            rows["label"].append(int(labels[i]))
            for a, v in values.items():
                rows[a].append(CAPTION_ATTRIBUTES[a].index(v))
        splits[name] = datasets.Dataset.from_dict(
            rows, features=features, info=datasets.DatasetInfo(description=description, features=features))
    return datasets.DatasetDict(splits)


def _heldout_combinations(heldout) -> list[dict]:
    """Check the ``heldout`` option; -> its combinations with value names."""
    if isinstance(heldout, dict) or not isinstance(heldout, (list, tuple)):
        raise ValueError(f"heldout must be a list of dicts of attribute values, got {heldout!r}")
    held = []
    for combination in heldout:
        if not isinstance(combination, dict):
            raise ValueError(f"heldout must be a list of dicts of attribute values, got the item {combination!r}")
        combination = dict(combination)
        label = combination.pop("label", None)
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9):
            raise ValueError(f"heldout: label must be a digit 0..9, got {label!r}")
        names = _attribute_names(combination, "heldout")
        held.append(names if label is None else {"label": label, **names})
    return held


def _draw_caption_digit(original: np.ndarray, canvas_size: int, size: str, position: str,
                        thickness: str) -> Image.Image:
    """One 8x8 sklearn digit (0..16) -> a ``canvas_size`` PIL "L" image, drawn as :func:`digits_captions` says."""
    from scipy.spatial import cKDTree

    scale = canvas_size / 32
    height, radius = _GLYPH_HEIGHTS[size] * scale, _PEN_RADII[thickness] * scale
    points = _skeleton_points(original, max(40, round(2 * _GLYPH_HEIGHTS["large"] * scale)))  # 2+ points a pixel
    # Fit the skeleton's box to `height` (pixel centres 0 .. height - 1), keeping its aspect unless it would
    # come out wider than high (then it is narrowed to square).
    extent = np.maximum(points.max(axis=0) - points.min(axis=0), 1.0)  # >= 1: a straight "1" has no width
    points = points - points.min(axis=0)
    points[:, 0] *= (height - 1) / extent[0]
    points[:, 1] *= min((height - 1) / extent[0], (height - 1) / extent[1])
    # Place it: the box's middle at the canvas's, the centre of mass of the skeleton at a quarter or three
    # quarters of the width, moved inwards where the ink would come nearer the border than the margin.
    reach = np.ceil(radius)  # the pen's ink reaches less than this far
    dy = (canvas_size - 1) / 2 - points[:, 0].max() / 2
    target = canvas_size / 4 if position == "left" else 3 * canvas_size / 4
    low, high = _CANVAS_MARGIN + reach - 1, canvas_size - _CANVAS_MARGIN - reach - points[:, 1].max()
    dx = float(np.clip(target - 0.5 - points[:, 1].mean(), low, high))
    # The pen: a one-pixel ramp from full ink at `radius - 0.5` from the skeleton to background at `radius + 0.5`,
    # so the ink (above half) is the pixels nearer than `radius`.
    grid = np.stack(np.mgrid[:canvas_size, :canvas_size], axis=-1).reshape(-1, 2)
    distance, _ = cKDTree(points + [dy, dx]).query(grid)
    ink = np.clip(radius + 0.5 - distance.reshape(canvas_size, canvas_size), 0.0, 1.0)
    return Image.fromarray(np.rint(ink * 255).astype(np.uint8), mode="L")


def _skeleton_points(original: np.ndarray, height: int) -> np.ndarray:
    """The skeleton of one 8x8 sklearn digit as (K, 2) (row, column) points, from its box upscaled to about
    ``height``: dense enough (several per output pixel) to stand for the curve."""
    from scipy import ndimage

    rows, cols = np.nonzero(original >= 4)  # the digit's box: faint (< 4 of 16) border pixels left out
    # One blank original pixel around the box, so that strokes on its edge upscale as strokes, not as cut-offs.
    crop = np.pad(original[rows.min():rows.max() + 1, cols.min():cols.max() + 1], 1)
    scale = height / (crop.shape[0] - 2)
    grey = Image.fromarray(np.rint(crop * (255.0 / 16.0)).astype(np.uint8), mode="L")
    size = (round(crop.shape[1] * scale), round(crop.shape[0] * scale))
    shape = np.asarray(grey.resize(size, Image.Resampling.BICUBIC)) >= _SKELETON_LEVEL
    skeleton = _thin(shape)
    # Drop specks (pieces under a tenth of the largest), as the measures of hfx.metrics.attributes do: a faint
    # stroke that upscales into a dot would otherwise stretch the box the digit is fitted to.
    pieces, _ = ndimage.label(skeleton, structure=np.ones((3, 3)))
    sizes = np.bincount(pieces.ravel())[1:]
    return np.argwhere(np.isin(pieces, 1 + np.flatnonzero(sizes >= sizes.max() / 10))).astype(np.float64)


def _zhang_suen_tables() -> tuple[np.ndarray, np.ndarray]:
    """For each of the 256 neighbourhoods (bit k: neighbour P(k+2) of the paper, clockwise from north), whether
    the first / second sub-iteration of Zhang-Suen removes the centre pixel."""
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
    p = [bits[:, k] for k in range(8)]
    neighbours = bits.sum(axis=1)
    transitions = sum((p[k] == 0) & (p[(k + 1) % 8] == 1) for k in range(8))
    removable = (neighbours >= 2) & (neighbours <= 6) & (transitions == 1)
    first = removable & (p[0] * p[2] * p[4] == 0) & (p[2] * p[4] * p[6] == 0)
    second = removable & (p[0] * p[2] * p[6] == 0) & (p[0] * p[4] * p[6] == 0)
    return first, second


_ZHANG_SUEN = _zhang_suen_tables()


def _thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning (CACM 27(3), 1984) of a 2-D bool mask to a one-pixel-wide, connected skeleton."""
    image = np.pad(mask, 1).astype(np.uint8)
    core = image[1:-1, 1:-1]
    # The 8 neighbours clockwise from north: P2 .. P9 in the paper (views: they follow the removals).
    neighbours = [image[:-2, 1:-1], image[:-2, 2:], image[1:-1, 2:], image[2:, 2:],
                  image[2:, 1:-1], image[2:, :-2], image[1:-1, :-2], image[:-2, :-2]]
    changed = True
    while changed:
        changed = False
        for table in _ZHANG_SUEN:
            code = neighbours[0].copy()
            for k in range(1, 8):
                code |= neighbours[k] << k
            remove = table[code] & (core == 1)
            if remove.any():
                core[remove] = 0
                changed = True
    return core.astype(bool)


BUILTIN_DATASETS = {"digits": digits, "digits-strokes": digits_strokes, "stdlib-text": stdlib_text,
                    "stdlib-docstrings": stdlib_docstrings, "digits-captions": digits_captions}


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
