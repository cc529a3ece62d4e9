"""Loading hfx pipelines through diffusers' own entry point: ``DiffusionPipeline.from_pretrained`` on a folder, in
a fresh process and by Hub repo id (loopback Hub); the registration behind it; errors that name the repo."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import types

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline, ModelMixin, UNet2DModel
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from hub_server import VALID_TOKEN, hub_fixture  # noqa: F401  (the `hub` fixture)
from huggingface_hub import HfApi, constants, hf_api

import hfx
import hfx.pipelines
from hfx import _registry
from hfx.models.noisy_classifier import NoisyClassifier
from hfx.models.vae import HfxVAEConfig, HfxVAEModel
from hfx.pipelines import ClassConditionalPipeline, LatentDiffusionPipeline

NUM_CLASSES = 3


def tiny_unet(sample_size: int, channels: int) -> UNet2DModel:
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       num_class_embeds=NUM_CLASSES + 1).eval()


def tiny_classifier(sample_size: int, channels: int) -> NoisyClassifier:
    return NoisyClassifier(sample_size=sample_size, in_channels=channels, num_classes=NUM_CLASSES,
                           block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2, norm_num_groups=4).eval()


def class_conditional_pipeline() -> ClassConditionalPipeline:
    torch.manual_seed(0)
    pipe = ClassConditionalPipeline(tiny_unet(8, 1), DDIMScheduler(num_train_timesteps=100),
                                    classifier=tiny_classifier(8, 1), class_names=["a", "b", "c"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent_diffusion_pipeline() -> LatentDiffusionPipeline:
    """Every kind of hfx component at once: an HfxVAEModel (transformers) and a NoisyClassifier (diffusers)."""
    torch.manual_seed(0)
    vae = HfxVAEModel(HfxVAEConfig(image_size=8, block_out_channels=[8, 16], latent_channels=2, norm_num_groups=4))
    pipe = LatentDiffusionPipeline(vae.eval(), tiny_unet(4, 2), DDIMScheduler(num_train_timesteps=100, clip_sample=False),
                                   classifier=tiny_classifier(4, 2))
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPELINES = {"class_conditional": class_conditional_pipeline, "latent_diffusion": latent_diffusion_pipeline}


def images(pipe) -> torch.Tensor:
    return pipe([0, 2], num_inference_steps=3, classifier_scale=1.0, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


def assert_same_pipeline(loaded, pipe) -> None:
    assert type(loaded) is type(pipe)
    assert {name: type(c) for name, c in loaded.components.items()} == {name: type(c) for name, c in pipe.components.items()}
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(images(loaded), images(pipe))


# ---------------------------------------------------------------------------------- registration
def test_every_hfx_pipeline_is_registered_with_diffusers():
    pipeline_classes = {obj for obj in vars(hfx.pipelines).values()
                        if isinstance(obj, type) and issubclass(obj, DiffusionPipeline)}
    assert {_registry._resolve(path) for path, _ in _registry.PIPELINES} == pipeline_classes
    for cls in pipeline_classes:
        assert getattr(__import__("diffusers"), cls.__name__) is cls
    assert LOADABLE_CLASSES["hfx.models.noisy_classifier.modeling_noisy_classifier"] == {
        "ModelMixin": ["save_pretrained", "from_pretrained"]}
    assert LOADABLE_CLASSES["hfx.models.vae.modeling_vae"] == {"PreTrainedModel": ["save_pretrained", "from_pretrained"]}


def test_registration_is_idempotent_and_never_shadows_diffusers(monkeypatch):
    import diffusers

    before = {name: dict(classes) for name, classes in LOADABLE_CLASSES.items()}
    hfx.register_all()
    hfx.register_all()
    assert {name: dict(classes) for name, classes in LOADABLE_CLASSES.items()} == before
    assert diffusers.ClassConditionalPipeline is ClassConditionalPipeline

    # A re-imported module defines the same class again: it replaces the old one, no clash.
    monkeypatch.setattr(diffusers, "ClassConditionalPipeline", ClassConditionalPipeline)
    again = type("ClassConditionalPipeline", (ClassConditionalPipeline,), {"__module__": ClassConditionalPipeline.__module__})
    _registry.register_pipeline(again, [])
    assert diffusers.ClassConditionalPipeline is again

    clash = type("DDPMPipeline", (DiffusionPipeline,), {"__module__": __name__})
    with pytest.raises(ValueError, match="diffusers already has DDPMPipeline"):
        _registry.register_pipeline(clash, [])
    assert diffusers.DDPMPipeline is DDPMPipeline

    class NotAModel(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="derives from none of the diffusers or transformers classes"):
        _registry.register_pipeline(ClassConditionalPipeline, [NotAModel])
    bare = types.ModuleType("hfx_test_bare_module")  # defines a model without importing ModelMixin by name
    monkeypatch.setitem(sys.modules, bare.__name__, bare)
    bare.Model = type("Model", (ModelMixin,), {"__module__": bare.__name__})
    with pytest.raises(ValueError, match="hfx_test_bare_module must import ModelMixin"):
        _registry.register_pipeline(ClassConditionalPipeline, [bare.Model])
    assert bare.__name__ not in LOADABLE_CLASSES


# ---------------------------------------------------------------------------------- folders
# What model_index.json holds, as hfx 0.1.0 wrote it: folders saved then must keep loading.
SAVED_INDEX = {
    "class_conditional": {
        "_class_name": "ClassConditionalPipeline", "class_names": {"0": "a", "1": "b", "2": "c"},
        "classifier": ["hfx.models.noisy_classifier.modeling_noisy_classifier", "NoisyClassifier"],
        "default_guidance_scale": 2.0, "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"],
    },
    "latent_diffusion": {
        "_class_name": "LatentDiffusionPipeline", "class_names": None,
        "classifier": ["hfx.models.noisy_classifier.modeling_noisy_classifier", "NoisyClassifier"],
        "default_guidance_scale": 2.0, "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"],
        "vae": ["hfx.models.vae.modeling_vae", "HfxVAEModel"],
    },
}


@pytest.mark.parametrize("kind", PIPELINES)
def test_diffusion_pipeline_from_pretrained_folder_returns_the_hfx_class(kind, tmp_path):
    pipe = PIPELINES[kind]()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert {k: v for k, v in index.items() if k != "_diffusers_version"} == SAVED_INDEX[kind]

    assert_same_pipeline(DiffusionPipeline.from_pretrained(tmp_path), pipe)
    assert_same_pipeline(type(pipe).from_pretrained(tmp_path), pipe)


FRESH_PROCESS = """
import sys
import hfx
from diffusers import DiffusionPipeline
for folder in sys.argv[1:]:
    print(type(DiffusionPipeline.from_pretrained(folder)).__qualname__)
"""


def test_import_hfx_is_all_a_fresh_process_needs(tmp_path):
    for kind, build in PIPELINES.items():
        build().save_pretrained(tmp_path / kind)
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, *(str(tmp_path / kind) for kind in PIPELINES)],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert out.split() == ["ClassConditionalPipeline", "LatentDiffusionPipeline"]


# ---------------------------------------------------------------------------------- Hub repo ids
def upload(hub, pipe, tmp_path, name: str) -> str:
    repo_id = hub.new_repo_id(name)
    pipe.save_pretrained(tmp_path / name)
    api = HfApi(endpoint=hub.url, token=VALID_TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / name)
    return repo_id


@pytest.mark.parametrize("kind", PIPELINES)
def test_diffusion_pipeline_from_pretrained_by_repo_id(kind, hub, tmp_path):
    pipe = PIPELINES[kind]()
    repo_id = upload(hub, pipe, tmp_path, kind)
    assert_same_pipeline(DiffusionPipeline.from_pretrained(repo_id, cache_dir=tmp_path / "cache"), pipe)
    assert_same_pipeline(type(pipe).from_pretrained(repo_id, cache_dir=tmp_path / "other-cache"), pipe)
    # diffusers' downloader fetched what loading needs, weights of the hfx components included
    snapshot = next((tmp_path / "cache").glob("models--*/snapshots/*"))
    assert (snapshot / "classifier" / "diffusion_pytorch_model.safetensors").is_file()
    assert kind != "latent_diffusion" or (snapshot / "vae" / "model.safetensors").is_file()


def first_line(error: pytest.ExceptionInfo) -> str:
    return str(error.value).splitlines()[0]


def test_repo_ids_that_cannot_load_raise_errors_naming_the_repo(hub, tmp_path, monkeypatch):
    pipe = class_conditional_pipeline()
    repo_id = upload(hub, pipe, tmp_path, "pipe")
    missing = hub.new_repo_id("missing")
    empty = hub.new_repo_id("empty")
    HfApi(endpoint=hub.url, token=VALID_TOKEN).create_repo(empty)
    cache = tmp_path / "cache"

    def load(repo, cls=ClassConditionalPipeline, **kwargs):
        return cls.from_pretrained(repo, cache_dir=cache, **kwargs)

    def refused(repo, reason, **kwargs):
        with pytest.raises(FileNotFoundError) as error:
            load(repo, **kwargs)
        assert first_line(error).startswith(f"cannot load pipeline {repo!r}"), first_line(error)
        assert reason in first_line(error)
        assert error.value.__cause__ is not None  # the Hub's own error stays in the traceback

    refused(missing, "no such repository on the Hub")
    refused(empty, "is not in the repository")
    refused(repo_id, "the repository has no revision 'no-such-branch'", revision="no-such-branch")
    refused(repo_id, "downloads are off (local_files_only=True)", local_files_only=True)
    load(repo_id)  # now cached

    with monkeypatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        refused(missing, "not in the local cache and the Hub is offline")
        assert_same_pipeline(load(repo_id), pipe)

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", closed)
    refused(missing, "not in the local cache and the Hub cannot be reached")
    assert_same_pipeline(load(repo_id), pipe)
    with pytest.raises(FileNotFoundError, match="cannot be reached"):
        load(missing, cls=LatentDiffusionPipeline)
    # diffusers' own entry point: its message names the repo on the first line too
    with pytest.raises(OSError) as error:
        DiffusionPipeline.from_pretrained(missing, cache_dir=cache)
    assert missing in first_line(error)
