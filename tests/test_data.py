"""Embedded datasets and the generic loader."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hfx.data import builtin_dataset, load, stdlib_files


def _image_key(image) -> bytes:
    return np.asarray(image).tobytes()


def test_digits_all_images_once_with_labels():
    from sklearn.datasets import load_digits

    ds = builtin_dataset("digits", image_size=8)
    assert set(ds) == {"train", "test"}
    assert len(ds["train"]) + len(ds["test"]) == 1797
    assert ds["train"].features["label"].names == [str(i) for i in range(10)]
    bunch = load_digits()
    expected = Counter(
        (np.rint(img * 255 / 16).astype(np.uint8).tobytes(), int(y)) for img, y in zip(bunch.images, bunch.target)
    )
    got = Counter((_image_key(r["image"]), r["label"]) for split in ds.values() for r in split)
    assert got == expected  # none lost, none duplicated, labels kept with their images
    assert set(ds["test"]["label"]) == set(range(10))


def test_digits_default_size_mode_and_reproducible_split():
    a = builtin_dataset("digits")
    b = builtin_dataset("digits")
    image = a["train"][0]["image"]
    assert image.mode == "L" and image.size == (16, 16)
    assert a["test"]["label"] == b["test"]["label"]
    assert [_image_key(x) for x in a["test"]["image"][:50]] == [_image_key(x) for x in b["test"]["image"][:50]]
    c = builtin_dataset("digits", seed=1)
    assert [_image_key(x) for x in a["test"]["image"][:50]] != [_image_key(x) for x in c["test"]["image"][:50]]


def test_unknown_names_and_options_are_named():
    with pytest.raises(ValueError, match="valid names: digits, digits-captions, digits-strokes, stdlib-docstrings, stdlib-text"):
        builtin_dataset("mnist")
    with pytest.raises(ValueError, match="no option 'size'.*image_size"):
        builtin_dataset("digits", size=8)


def test_stdlib_text_is_real_deterministic_python():
    ds = builtin_dataset("stdlib-text", max_files=40)
    again = builtin_dataset("stdlib-text", max_files=40)
    assert ds["train"]["path"] == again["train"]["path"]
    assert len(ds["train"]) > 20
    paths = list(ds["train"]["path"]) + list(ds["test"]["path"])
    assert not any("/test/" in p or p.startswith("test/") for p in paths)
    assert set(ds["train"]["path"]).isdisjoint(ds["test"]["path"])
    compile(ds["train"][0]["text"], ds["train"][0]["path"], "exec")  # whole files are valid Python
    assert "standard library" in ds["train"].info.description


def test_stdlib_split_is_stable_under_file_selection():
    small = builtin_dataset("stdlib-text", max_files=60)
    full_test = set(builtin_dataset("stdlib-text")["test"]["path"])
    assert set(small["test"]["path"]) <= full_test
    assert 0 < len(full_test) < len(stdlib_files()) * 0.15


def test_stdlib_chunks_respect_size():
    ds = builtin_dataset("stdlib-text", max_files=10, chunk_chars=500, min_chars=1)
    lengths = [len(t) for t in ds["train"]["text"]]
    assert max(lengths) <= 500
    whole = builtin_dataset("stdlib-text", max_files=10, min_chars=1)
    first = whole["train"][0]["path"]
    rebuilt = "".join(t for t, p in zip(ds["train"]["text"], ds["train"]["path"]) if p == first)
    assert rebuilt == whole["train"][0]["text"]


def test_load_builtin_imagefolder_and_text(tmp_path):
    from PIL import Image

    assert len(load("digits", image_size=8)["test"]) > 0
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    imgs = load(str(tmp_path / "imgs"), test_size=0.2, seed=0)
    assert len(imgs["train"]) == 8 and len(imgs["test"]) == 2
    assert imgs["train"].features["label"].names == ["cat", "dog"]

    (tmp_path / "docs").mkdir()
    for i in range(4):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i}\nsecond line\n")
    text = load(str(tmp_path / "docs"), test_size=0.25)
    assert len(text["train"]) == 3 and len(text["test"]) == 1
    assert all(t.startswith("document") and "second line" in t for t in text["train"]["text"])
    lines = load(str(tmp_path / "docs" / "0.txt"), sample_by="line", test_size=0.5)
    assert sorted(list(lines["train"]["text"]) + list(lines["test"]["text"])) == ["document 0", "second line"]

    (tmp_path / "rows.jsonl").write_text("".join(f'{{"x": {i}}}\n' for i in range(10)))
    rows = load(str(tmp_path / "rows.jsonl"), test_size=0.3)
    assert sorted(list(rows["train"]["x"]) + list(rows["test"]["x"])) == list(range(10))


def test_load_bad_local_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown file type '.bin'"):
        load(str(tmp_path / "weights.bin"))
