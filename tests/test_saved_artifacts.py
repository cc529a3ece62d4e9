"""Folders saved by an earlier hfx keep loading: diffusers records each component's module path in
``model_index.json``, so a moved module must leave an alias. The fixtures were saved by hfx 0.1.0 (see
tests/fixtures/make_saved_pipelines.py) with the images that version sampled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "saved_by_0.1.0"


@pytest.mark.parametrize("name", ["class_conditional", "latent_diffusion"])
def test_a_pipeline_saved_by_hfx_0_1_0_loads_and_samples_the_same_images(name):
    from diffusers import DiffusionPipeline

    import hfx  # noqa: F401  (registers the pipelines with diffusers)

    index = json.loads((FIXTURES / name / "model_index.json").read_text())
    assert index["classifier"][0] == "hfx.models.noisy_classifier.modeling_noisy_classifier"
    pipe = DiffusionPipeline.from_pretrained(FIXTURES / name)
    assert type(pipe).__name__ == index["_class_name"]
    pipe.set_progress_bar_config(disable=True)
    images = pipe([0, 2], guidance_scale=2.0, classifier_scale=1.0, num_inference_steps=3,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(images, load_file(FIXTURES / f"{name}-images.safetensors")["images"], rtol=0, atol=0)
