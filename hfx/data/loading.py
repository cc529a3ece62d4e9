"""One entry point for every dataset a recipe names: built-in, local folder or files, or the Hub."""

from __future__ import annotations

from pathlib import Path

import datasets

from hfx.data.builtin import BUILTIN_DATASETS, builtin_dataset

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TEXT_EXTENSIONS = {".txt", ".md", ".py", ".rst"}
# File extension -> the `datasets` packaged builder that reads it.
TABULAR_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load(
    spec: str,
    *,
    test_size: float = 0.1,
    seed: int = 0,
    sample_by: str = "document",
    **options,
) -> datasets.DatasetDict:
    """Load a dataset from any of the places a recipe may name, always as ``DatasetDict(train, test, ...)``.

    ``spec`` is tried in this order:

    1. a built-in name (``"digits"``, ``"stdlib-text"``); ``options`` go to :func:`builtin_dataset`;
    2. a folder written by ``save_to_disk``;
    3. a local folder of images, one sub-folder per class (``datasets``' ``imagefolder``);
    4. a local text file, or a folder of text files (``.txt .md .py .rst``): one example per file
       (``sample_by="document"``), per line or per paragraph;
    5. a local ``.csv/.tsv/.json/.jsonl/.parquet`` file;
    6. otherwise a Hub dataset name, through ``datasets.load_dataset(spec, **options)``.

    When the source has no ``test`` split (a ``validation`` split is renamed), ``test_size`` of ``train``
    is held out with ``seed``, so the split is reproducible.

    Raises:
        ValueError: a local path that holds nothing loadable, or a bad ``sample_by``.
        FileNotFoundError: a spec that looks like a local path but does not exist.
    """
    if spec in BUILTIN_DATASETS:
        return builtin_dataset(spec, **options)
    path = Path(spec).expanduser()
    if path.exists():
        loaded = _load_local(path, sample_by=sample_by, **options)
    elif spec.startswith((".", "/", "~")) or spec.endswith(tuple(TABULAR_BUILDERS) + tuple(TEXT_EXTENSIONS)):
        raise FileNotFoundError(f"dataset path {spec!r} does not exist")
    else:
        loaded = datasets.load_dataset(spec, **options)
    return _ensure_test_split(loaded, test_size=test_size, seed=seed)


def _load_local(path: Path, *, sample_by: str, **options) -> datasets.DatasetDict | datasets.Dataset:
    if sample_by not in ("document", "line", "paragraph"):
        raise ValueError(f"sample_by must be 'document', 'line' or 'paragraph', got {sample_by!r}")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return datasets.load_from_disk(str(path))
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
        suffixes = {p.suffix.lower() for p in files}
        if suffixes & IMAGE_EXTENSIONS:
            return datasets.load_dataset("imagefolder", data_dir=str(path), **options)
        text_files = [str(p) for p in files if p.suffix.lower() in TEXT_EXTENSIONS]
        if text_files:
            return datasets.load_dataset("text", data_files={"train": text_files}, sample_by=sample_by, **options)
        raise ValueError(
            f"folder {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}), no text files "
            f"({', '.join(sorted(TEXT_EXTENSIONS))}) and no save_to_disk dataset"
        )
    suffix = path.suffix.lower()
    if suffix in TABULAR_BUILDERS:
        return datasets.load_dataset(TABULAR_BUILDERS[suffix], data_files={"train": str(path)},
                                     **({"delimiter": "\t"} if suffix == ".tsv" else {}), **options)
    if suffix in TEXT_EXTENSIONS:
        return datasets.load_dataset("text", data_files={"train": str(path)}, sample_by=sample_by, **options)
    raise ValueError(
        f"cannot load {path}: unknown file type {suffix!r}; expected one of "
        f"{', '.join(sorted(TEXT_EXTENSIONS | set(TABULAR_BUILDERS)))}"
    )


def _ensure_test_split(loaded, *, test_size: float, seed: int) -> datasets.DatasetDict:
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    if "test" in loaded:
        return loaded
    if "validation" in loaded:
        splits = dict(loaded)
        splits["test"] = splits.pop("validation")
        return datasets.DatasetDict(splits)
    if "train" not in loaded:
        raise ValueError(f"dataset has neither a 'train' nor a 'test' split (splits: {', '.join(loaded)})")
    if len(loaded["train"]) < 2:
        raise ValueError(f"cannot hold out a test split from {len(loaded['train'])} example(s)")
    parts = loaded["train"].train_test_split(test_size=test_size, seed=seed)
    splits = {name: ds for name, ds in loaded.items() if name != "train"}
    splits.update(train=parts["train"], test=parts["test"])
    return datasets.DatasetDict(splits)
