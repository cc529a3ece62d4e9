"""``digits-captions`` (digits on a canvas, captioned with attributes a program can measure) and the measures
of :mod:`hfx.metrics.attributes`."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from hfx.data import CAPTION_ATTRIBUTES, HELDOUT_COMBINATIONS, builtin_dataset, caption_for, digits
from hfx.data.builtin import CAPTION_PHRASES, CAPTION_TEMPLATES, DIGIT_WORDS
from hfx.metrics import DIGIT_ATTRIBUTES, measure_position, measure_size, measure_thickness


@pytest.fixture(scope="module")
def data():
    return builtin_dataset("digits-captions")


def _pixels(split) -> torch.Tensor:
    """PIL "L" images -> (B, 1, H, W) in [-1, 1], as a model would produce them."""
    return torch.tensor(np.stack([np.asarray(im) for im in split["image"]]), dtype=torch.float32)[:, None] / 127.5 - 1


def _matches(combination: dict, row: dict) -> bool:
    names = {a: CAPTION_ATTRIBUTES[a][row[a]] for a in CAPTION_ATTRIBUTES}
    return all((row["label"] if k == "label" else names[k]) == v for k, v in combination.items())


def test_every_original_once_and_the_split_is_the_digits_split(data):
    from sklearn.datasets import load_digits

    assert list(data) == ["train", "test", "heldout"]
    sources = {name: list(split["source"]) for name, split in data.items()}
    everything = [s for ids in sources.values() for s in ids]
    assert len(everything) == len(set(everything)) == 1797
    # The train originals are exactly those of `digits` (same seed): no test digit is drawn in train.
    originals = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    digits_train = sorted(np.asarray(im).tobytes() for im in digits(image_size=8)["train"]["image"])
    assert sorted(originals[i].tobytes() for i in sources["train"]) == digits_train
    assert {len(split) for split in data.values()} == {1437, 182, 178}
    image = data["train"][0]["image"]
    assert image.mode == "L" and image.size == (32, 32)
    assert data["train"].column_names == ["image", "text", "label", "size", "position", "thickness", "source"]
    for name, (_, values) in DIGIT_ATTRIBUTES.items():  # the data and the measures name the values alike
        assert tuple(data["train"].features[name].names) == values == CAPTION_ATTRIBUTES[name]


def test_heldout_combinations_only_in_heldout(data):
    rows = {name: list(split.remove_columns("image")) for name, split in data.items()}
    for combination in HELDOUT_COMBINATIONS:
        assert not any(_matches(combination, r) for r in rows["train"] + rows["test"]), combination
        assert any(_matches(combination, r) for r in rows["heldout"]), combination
    assert all(any(_matches(c, r) for c in HELDOUT_COMBINATIONS) for r in rows["heldout"])
    # The combination held out for every digit is there for every digit.
    everyone = [c for c in HELDOUT_COMBINATIONS if "label" not in c]
    assert everyone and {r["label"] for r in rows["heldout"] if _matches(everyone[0], r)} == set(range(10))
    # train sees every other combination, and each attribute value, with every digit.
    seen = {(r["label"], r["size"], r["position"], r["thickness"]) for r in rows["train"]}
    for label, *combo in itertools.product(range(10), *(range(len(v)) for v in CAPTION_ATTRIBUTES.values())):
        row = {"label": label, **dict(zip(CAPTION_ATTRIBUTES, combo))}
        assert ((label, *combo) in seen) != any(_matches(c, row) for c in HELDOUT_COMBINATIONS)
    description = data["train"].info.description
    assert "1437 train, 182 test, 178 heldout" in description
    assert "label=3, size=large, position=left, thickness=thin" in description
    assert "size=small, position=right, thickness=thick" in description


def test_captions_name_the_attributes_in_several_phrasings(data):
    used = {(a, v): set() for a, values in CAPTION_ATTRIBUTES.items() for v in values}
    numerals = words = 0
    for row in data["train"].remove_columns("image"):
        text = row["text"]
        for attribute, values in CAPTION_ATTRIBUTES.items():
            for v, phrases in CAPTION_PHRASES[attribute].items():
                found = [p for p in phrases if re.search(rf"\b{p}\b", text)]
                if v == values[row[attribute]]:
                    assert found, (text, attribute)
                    used[attribute, v].add(max(found, key=len))  # "on the right side" holds "on the right"
                else:
                    assert not found, (text, attribute)  # never a phrase of another value
        numeral, word = bool(re.search(rf"\b{row['label']}\b", text)), DIGIT_WORDS[row["label"]] in text
        assert numeral != word, text  # the digit, once, as a numeral or as a word
        numerals, words = numerals + numeral, words + word
    assert all(len(p) == 3 for p in used.values()), used  # every phrasing of every value occurs
    assert numerals > 300 and words > 300
    assert len(set(data["train"]["text"])) > 500
    assert caption_for(3, {"size": "small", "thickness": "thick", "position": "left"}) == "a small thick 3 on the left"
    assert caption_for(3, {"size": 0, "position": 0, "thickness": 1}, 1, {"position": 1}) == \
        "the digit three, small, drawn with thick strokes, in the left half"
    assert len({caption_for(7, {"size": 1, "position": 1, "thickness": 0}, t) for t in range(len(CAPTION_TEMPLATES))}) \
        == len(CAPTION_TEMPLATES)


def test_same_seed_same_dataset(data):
    again = builtin_dataset("digits-captions")
    for name in data:
        assert again[name]["text"] == data[name]["text"] and again[name]["source"] == data[name]["source"]
        assert [again[name][a] for a in CAPTION_ATTRIBUTES] == [data[name][a] for a in CAPTION_ATTRIBUTES]
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(again[name]["image"][:40],
                                                                                  data[name]["image"][:40]))


def test_measures_recover_the_attributes_of_the_real_images(data):
    accuracies = {}
    for name, split in data.items():
        pixels = _pixels(split)
        for attribute, (measure, _) in DIGIT_ATTRIBUTES.items():
            measured = measure(pixels)
            accuracies[name, attribute] = (measured == torch.tensor(split[attribute])).double().mean().item()
    print({f"{n}/{a}": round(v, 4) for (n, a), v in accuracies.items()})
    assert all(v >= 0.98 for v in accuracies.values()), accuracies


def _rectangles(boxes, size: int = 32) -> torch.Tensor:
    """Ink (+1) rectangles (top, left, height, width) on background (-1): (B, 1, size, size)."""
    images = -torch.ones(len(boxes), 1, size, size)
    for image, (top, left, height, width) in zip(images, boxes):
        image[0, top:top + height, left:left + width] = 1
    return images


def test_measures_of_drawn_rectangles():
    # Size: the ink's height, threshold 17.9 px at 32.
    assert measure_size(_rectangles([(10, 4, 12, 3), (6, 4, 20, 3), (0, 4, 17, 3), (0, 4, 18, 3)])).tolist() \
        == [0, 1, 0, 1]
    assert measure_size(_rectangles([(12, 4, 24, 3)], size=64)).tolist() == [0]  # scales with the image
    # Position: the ink's centre of mass left or right of the middle.
    assert measure_position(_rectangles([(8, 6, 16, 4), (8, 22, 16, 4), (8, 2, 16, 13), (8, 17, 16, 13)])).tolist() \
        == [0, 1, 0, 1]
    # Thickness: stroke width 1 (bars 1-2 px wide) is thin, 1.5 (4 px) and more is thick.
    assert measure_thickness(_rectangles([(6, 8, 20, 1), (6, 8, 20, 2), (6, 8, 20, 4), (6, 8, 20, 6)])).tolist() \
        == [0, 0, 1, 1]
    # A speck (under a tenth of the digit's ink) is not the digit: it moves neither box nor centre.
    speckled = _rectangles([(8, 4, 12, 3)])
    speckled[0, 0, 30, 30] = 1
    assert measure_size(speckled).tolist() == [0] and measure_position(speckled).tolist() == [0]
    # No ink: -1, never a right answer. Other layouts and value ranges.
    blank = -torch.ones(2, 1, 32, 32)
    for measure in (measure_size, measure_position, measure_thickness):
        assert measure(blank).tolist() == [-1, -1]
        # (B, H, W) numpy in [0, 1]: a large, right, thick bar.
        assert measure(((_rectangles([(8, 22, 20, 4)])[:, 0] + 1) / 2).numpy(), low=0.0, high=1.0).tolist() == [1]
    with pytest.raises(ValueError, match="pixels must be greyscale"):
        measure_size(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("options, message", [
    ({"canvas_size": 16}, r"^canvas_size must be an int >= 24, got 16$"),
    ({"test_size": 1.5}, r"^test_size must be in \(0, 1\), got 1.5$"),
    ({"heldout": {"size": "small"}}, r"^heldout must be a list of dicts"),
    ({"heldout": [{"colour": "red"}]}, r"^heldout has an unknown attribute 'colour'; attributes: size, position"),
    ({"heldout": [{"size": "medium"}]}, r"^heldout: size 'medium' is not one of small, large$"),
    ({"heldout": [{"label": 12, "size": "small"}]}, r"^heldout: label must be a digit 0\.\.9, got 12$"),
    ({"heldout": [{"label": 4}]}, r"^heldout holds out every combination of digit 4; train needs at least one$"),
    ({"size": 3}, r"no option 'size'; its options: canvas_size, test_size, heldout, seed$"),
])
def test_bad_options_are_one_line_errors_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message) as error:
        builtin_dataset("digits-captions", **options)
    assert "\n" not in str(error.value)


def test_bad_caption_arguments_are_named():
    with pytest.raises(ValueError, match=r"^label must be a digit 0\.\.9, got 10$"):
        caption_for(10, {"size": 0, "position": 0, "thickness": 0})
    with pytest.raises(ValueError, match=r"^attributes lacks thickness; a caption names size, position, thickness$"):
        caption_for(1, {"size": 0, "position": 0})
    with pytest.raises(ValueError, match=r"^attributes: position 'top' is not one of left, right$"):
        caption_for(1, {"size": 0, "position": "top", "thickness": 0})


def test_a_custom_heldout_list():
    data = builtin_dataset("digits-captions", heldout=[{"label": 3, "size": "small"}], seed=1)
    heldout = data["heldout"]
    assert set(heldout["label"]) == {3} and set(heldout["size"]) == {0}
    assert not any(label == 3 and size == 0 for label, size in zip(data["train"]["label"], data["train"]["size"]))
    # Half the test 3s are held out; the other digits hold nothing out, so all their test originals stay in test.
    threes = data["test"]["label"].count(3) + len(heldout)
    assert len(data["test"]) + len(heldout) == 360 and len(heldout) == threes // 2
    assert "held out of train (heldout only): label=3, size=small" in heldout.info.description
