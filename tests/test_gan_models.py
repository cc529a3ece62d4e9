"""The GAN family and its pipeline: save/load round trips give equal outputs; truncation (psi 0 = the mean-w
image, psi 1 = unchanged); style mixing; (de)modulation and AdaIN; the projection term; spectral norm; GANPipeline
by folder, by repo id and in a fresh process; every bad argument is a one-line error naming it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from hub_server import VALID_TOKEN, hub_fixture  # noqa: F401  (the `hub` fixture)
from huggingface_hub import HfApi
from kill_resume import NO_HFX

import hfx  # noqa: F401  (registers the pipeline)
from hfx.models.gan import GENERATORS, DCGANDiscriminator, DCGANGenerator, StyleGANGenerator
from hfx.models.gan.stylegan_gan import AdaINConv2d, ModulatedConv2d
from hfx.pipelines import GANPipeline

TINY_STYLE = dict(image_size=8, latent_dim=8, w_dim=8, base_channels=4, max_channels=8, mapping_layers=2)


def tiny_models():
    torch.manual_seed(0)
    return {
        "dcgan": DCGANGenerator(image_size=8, latent_dim=8, base_channels=4),
        "dcgan-conditional": DCGANGenerator(image_size=8, latent_dim=8, base_channels=4, num_classes=3, class_embed_dim=5),
        "stylegan": StyleGANGenerator(**TINY_STYLE),
        "stylegan-adain-conditional": StyleGANGenerator(**TINY_STYLE, num_classes=3, style_mode="adain"),
        "discriminator": DCGANDiscriminator(image_size=8, base_channels=4),
        "projection-sn": DCGANDiscriminator(image_size=16, base_channels=4, num_classes=3, norm="none", spectral_norm=True),
    }


def call(model, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3 if model.config.num_classes else None
    if isinstance(model, DCGANDiscriminator):
        size = model.config.image_size
        return model(torch.randn(n, 1, size, size, generator=g), labels).scores
    kwargs = {"noise_mode": "const"} if isinstance(model, StyleGANGenerator) else {}
    return model(torch.randn(n, model.config.latent_dim, generator=g), labels, **kwargs).sample


@pytest.mark.parametrize("name", list(tiny_models()))
def test_a_saved_model_reloads_with_equal_outputs(name, tmp_path):
    model = tiny_models()[name]
    model.train()
    for seed in range(3):  # moves batch-norm statistics, spectral-norm vectors and the tracked mean w
        call(model, 8, seed)
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(call(loaded), call(model))
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == type(model).__name__


def test_generators_map_latents_to_images_of_the_configured_shape():
    for name, model in tiny_models().items():
        if name.startswith(("dcgan", "stylegan")):
            out = call(model.eval(), 5)
            assert out.shape == (5, 1, 8, 8), name
    assert GENERATORS == {"dcgan": DCGANGenerator, "stylegan": StyleGANGenerator}


# ---------------------------------------------------------------------------------------------- StyleGAN ideas
def trained_style_generator(**kwargs) -> StyleGANGenerator:
    torch.manual_seed(0)
    model = StyleGANGenerator(**{**TINY_STYLE, **kwargs}).train()
    for seed in range(20):  # the tracked mean w moves away from zero in training mode
        call(model, 8, seed)
    with torch.no_grad():
        for layer in model.layers:
            layer.noise_strength.fill_(0.5)
    return model.eval()


def test_truncation_psi_0_gives_the_mean_w_image_and_psi_1_changes_nothing():
    model = trained_style_generator()
    assert model.w_avg.abs().sum() > 0
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    at_zero = model(z, truncation_psi=0.0, noise_mode="const").sample
    mean_image = model.synthesize(model.w_avg[:1, None].expand(1, model.num_ws, -1), noise_mode="const")
    assert torch.allclose(at_zero, mean_image.expand(4, -1, -1, -1), atol=1e-6)
    assert torch.equal(model(z, truncation_psi=1.0, noise_mode="const").sample, model(z, noise_mode="const").sample)
    half = model.map(z, truncation_psi=0.5)
    full = model.map(z)
    assert torch.allclose(half, model.w_avg[0] + 0.5 * (full - model.w_avg[0]), atol=1e-6)


def test_a_conditional_generator_truncates_towards_its_classs_mean_w():
    model = trained_style_generator(num_classes=3)
    assert not torch.allclose(model.w_avg[0], model.w_avg[1])
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    images = model(z, labels, truncation_psi=0.0, noise_mode="const").sample
    assert torch.allclose(images[0], images[3], atol=1e-6) and not torch.allclose(images[0], images[1])


def test_style_mixing_takes_the_layers_from_the_cutoff_on_from_the_second_latent():
    model = trained_style_generator()
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    for cutoff in range(1, model.num_ws):
        mixed = model(z1, mixing_latents=z2, mixing_cutoff=cutoff, noise_mode="const").sample
        ws = torch.cat([model.map(z1)[:, :cutoff], model.map(z2)[:, cutoff:]], dim=1)
        assert torch.allclose(mixed, model.synthesize(ws, noise_mode="const"), atol=1e-6)
        assert not torch.allclose(mixed, model(z1, noise_mode="const").sample)
    assert model.num_ws == 4  # 8x8: one layer at 4x4, two at 8x8, the last ToRGB
    with pytest.raises(ValueError, match=r"^mixing_cutoff must be in \[1, 4\) \(this generator takes 4 w vectors\), got 4$"):
        model(z1, mixing_latents=z2, mixing_cutoff=4)
    with pytest.raises(ValueError, match="^style mixing needs both mixing_latents and mixing_cutoff$"):
        model(z1, mixing_latents=z2)


def test_per_layer_noise_comes_from_the_generator_or_a_fixed_buffer():
    model = trained_style_generator()
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))

    def sample(mode, seed=None):
        return model(z, noise_mode=mode, generator=None if seed is None else torch.Generator().manual_seed(seed)).sample

    assert torch.equal(sample("random", 0), sample("random", 0)) and not torch.allclose(sample("random", 0), sample("random", 1))
    assert torch.equal(sample("const"), sample("const")) and not torch.allclose(sample("const"), sample("none"))
    with pytest.raises(ValueError, match=r"^noise_mode must be one of 'random', 'const', 'none', got 'fixed'$"):
        sample("fixed")


def test_the_modulated_convolution_equals_stylegan2s_grouped_per_sample_kernels():
    """Modulate each sample's kernel, demodulate each filter, one group per sample (StyleGAN2's fused form)."""
    torch.manual_seed(0)
    conv, x, w = ModulatedConv2d(4, 3, 3, w_dim=6), torch.randn(2, 4, 5, 5), torch.randn(2, 6)
    styles = conv.affine(w)
    kernels = conv.weight[None] * conv.weight_gain * styles[:, None, :, None, None]  # (B, out, in, k, k)
    kernels = kernels * (kernels.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    fused = torch.nn.functional.conv2d(x.reshape(1, 8, 5, 5), kernels.flatten(0, 1), padding=1, groups=2)
    assert torch.allclose(conv(x, w), fused.reshape(2, 3, 5, 5), atol=1e-5)


def test_demodulation_makes_a_layer_blind_to_the_scale_of_its_style_and_adain_to_its_inputs_statistics():
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 5, 5), torch.randn(2, 6)
    modulated = ModulatedConv2d(4, 3, 3, w_dim=6)
    before = modulated(x, w)
    with torch.no_grad():  # scaling A(w) by 3 scales every style by 3: demodulation removes it
        modulated.affine.weight.mul_(3)
        modulated.affine.bias.mul_(3)
    assert torch.allclose(modulated(x, w), before, atol=1e-5)
    adain = AdaINConv2d(4, 3, 3, w_dim=6)
    assert torch.allclose(adain(3 * x + 1, w), adain(x, w), atol=1e-4)


# ---------------------------------------------------------------------------------------------- discriminators
def test_the_projection_discriminator_adds_the_class_embedding_dotted_with_the_features():
    model = tiny_models()["projection-sn"].eval()
    x, labels = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 1])
    out = model(x, labels)
    expected = model.head(out.features).squeeze(1) + (model.class_projection(labels) * out.features).sum(1)
    assert torch.allclose(out.scores, expected, atol=1e-6)


def test_spectral_norm_bounds_every_layer_to_a_largest_singular_value_of_one():
    model = DCGANDiscriminator(image_size=16, base_channels=4, num_classes=3, norm="none", spectral_norm=True).train()
    for seed in range(30):  # one power iteration per training forward
        call(model, 4, seed)
    layers = [m for m in model.modules() if hasattr(m, "parametrizations")]
    assert len(layers) == 4  # two convolutions, the head and the class embedding
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.02)


# ---------------------------------------------------------------------------------------------- bad arguments
BAD_MODELS = [
    (lambda: DCGANGenerator(image_size=12), "image_size must be a power of two >= 8"),
    (lambda: DCGANGenerator(latent_dim=0), "latent_dim must be an integer >= 1, got 0"),
    (lambda: DCGANGenerator(num_classes=1), "num_classes must be an integer >= 2, got 1"),
    (lambda: DCGANGenerator(class_embed_dim=4), "class_embed_dim is set, but num_classes is None"),
    (lambda: DCGANDiscriminator(norm="group"), "norm must be one of 'batch', 'layer', 'none', got 'group'"),
    (lambda: DCGANDiscriminator(spectral_norm="yes"), "spectral_norm must be True or False, got 'yes'"),
    (lambda: StyleGANGenerator(style_mode="adain2"), "style_mode must be one of 'modulated', 'adain', got 'adain2'"),
    (lambda: StyleGANGenerator(mapping_lr_multiplier=2.0), "mapping_lr_multiplier must be in (0, 1], got 2.0"),
    (lambda: StyleGANGenerator(w_avg_beta=1.0), "w_avg_beta must be in [0, 1), got 1.0"),
]

BAD_CALLS = [
    (lambda m: m["dcgan"](torch.randn(2, 8), torch.tensor([0, 1])), "class_labels given, but this generator is unconditional"),
    (lambda m: m["dcgan-conditional"](torch.randn(2, 8)), "this generator is class-conditional (num_classes=3): pass class_labels"),
    (lambda m: m["dcgan-conditional"](torch.randn(2, 8), torch.tensor([0, 3])), "class_labels must lie in [0, 3), got ids from 0 to 3"),
    (lambda m: m["dcgan-conditional"](torch.randn(2, 8), torch.tensor([0.0, 1.0])), "class_labels must be integer ids of shape (2,)"),
    (lambda m: m["dcgan"](torch.randn(2, 8), truncation_psi=0.7), "truncation_psi=0.7 needs a generator with a mapping network"),
    (lambda m: m["dcgan"](torch.randn(2, 9)), "latents must have shape (batch, 8), got (2, 9)"),
    (lambda m: m["stylegan"](torch.randn(2, 8), truncation_psi=1.5), "truncation_psi must be a number in [0, 1]"),
    (lambda m: m["discriminator"](torch.randn(2, 3, 8, 8)), "sample must have shape (batch, 1, 8, 8), got (2, 3, 8, 8)"),
    (lambda m: m["projection-sn"](torch.randn(2, 1, 16, 16)), "this discriminator is class-conditional (num_classes=3)"),
]


@pytest.mark.parametrize("build, message", BAD_MODELS)
def test_bad_constructor_arguments_are_one_line_errors_naming_them(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("bad, message", BAD_CALLS)
def test_bad_call_arguments_are_one_line_errors_naming_them(bad, message):
    with pytest.raises(ValueError) as error:
        bad(tiny_models())
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------- GANPipeline
def conditional_pipeline() -> GANPipeline:
    generator = trained_style_generator(num_classes=3)
    discriminator = DCGANDiscriminator(image_size=8, base_channels=4, num_classes=3).eval()
    return GANPipeline(generator, discriminator, class_names=["zero", "one", "two"])


def images(pipe, **kwargs) -> torch.Tensor:
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images


FRESH = """
import sys, torch, hfx
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
out = pipe(class_labels=[0, 2, 1], truncation_psi=0.7, generator=torch.Generator().manual_seed(0), output_type="pt")
torch.save({"type": type(pipe).__name__, "images": out.images}, sys.argv[2])
"""


def test_the_pipeline_reloads_in_a_fresh_process_and_reproduces_its_images(tmp_path):
    pipe = conditional_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["generator"] == ["hfx.models.gan.stylegan_gan", "StyleGANGenerator"]
    assert index["discriminator"] == ["hfx.models.gan.modeling_gan", "DCGANDiscriminator"]
    subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "pipe"), str(tmp_path / "out.pt")], check=True,
                   capture_output=True, timeout=120)
    fresh = torch.load(tmp_path / "out.pt", weights_only=True)
    assert fresh["type"] == "GANPipeline"
    assert torch.equal(fresh["images"], images(pipe, class_labels=["zero", "two", "one"], truncation_psi=0.7))
    loaded = GANPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.class_names == ["zero", "one", "two"] and loaded.num_classes == 3


def test_the_pipeline_outputs_pil_numpy_and_tensors_of_one_sample(tmp_path):
    pipe = GANPipeline(tiny_models()["dcgan"].eval())
    pt, np_images = images(pipe, batch_size=3), pipe(batch_size=3, generator=torch.Generator().manual_seed(0),
                                                       output_type="np").images
    pil = pipe(batch_size=3, generator=torch.Generator().manual_seed(0)).images
    assert pt.shape == (3, 1, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    assert np_images.shape == (3, 8, 8, 1) and torch.allclose(torch.from_numpy(np_images).permute(0, 3, 1, 2), pt)
    assert len(pil) == 3 and pil[0].size == (8, 8)
    assert isinstance(pipe(batch_size=1, return_dict=False), tuple)
    pipe.save_pretrained(tmp_path)
    assert GANPipeline.hub_card_usage(tmp_path) == "images = pipe(batch_size=4).images  # PIL images"
    grid, rows = GANPipeline.hub_card_samples(tmp_path)
    assert grid.shape == (64, 1, 8, 8) and rows == 8


def test_the_pipeline_loads_by_repo_id(hub, tmp_path):
    pipe = conditional_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    repo_id = hub.new_repo_id("gan")
    api = HfApi(endpoint=hub.url, token=VALID_TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "pipe")
    loaded = DiffusionPipeline.from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    assert type(loaded) is GANPipeline
    assert torch.equal(images(loaded, class_labels=[0, 1]), images(pipe, class_labels=[0, 1]))
    with pytest.raises(FileNotFoundError, match=r"cannot load pipeline .* no such repository"):
        GANPipeline.from_pretrained(hub.new_repo_id("missing"), cache_dir=tmp_path / "cache")


BAD_PIPELINE_CALLS = [
    ("unconditional", dict(class_labels=[1]), "class_labels given, but this pipeline's generator is unconditional"),
    ("unconditional", dict(), "give exactly one of batch_size"),
    ("unconditional", dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    ("unconditional", dict(batch_size=2, truncation_psi=0.5), "truncation_psi=0.5 needs a generator with a mapping network"),
    ("unconditional", dict(batch_size=2, output_type="jpg"), "output_type must be 'pil', 'np' or 'pt', got 'jpg'"),
    ("unconditional", dict(batch_size=2, latents=torch.randn(2, 3)), "latents must be a float tensor of shape (2, 8)"),
    ("conditional", dict(batch_size=2), "this pipeline's generator is class-conditional (3 classes): pass class_labels"),
    ("conditional", dict(class_labels=[0, 3]), "class id 3 is out of range [0, 3)"),
    ("conditional", dict(class_labels=["seven"]), "unknown class name 'seven': expected one of ['zero', 'one', 'two']"),
    ("conditional", dict(class_labels=[1.0]), "class label 1.0 must be an int id or a class name, not float"),
    ("conditional", dict(class_labels=[0], truncation_psi=1.2), "truncation_psi must be a finite number in [0, 1]"),
    ("conditional", dict(class_labels=[0], truncation_psi=float("nan")), "truncation_psi must be a finite number in [0, 1]"),
]


@pytest.mark.parametrize("kind, kwargs, message", BAD_PIPELINE_CALLS)
def test_bad_pipeline_arguments_are_one_line_errors_naming_them(kind, kwargs, message):
    pipe = conditional_pipeline() if kind == "conditional" else GANPipeline(tiny_models()["dcgan"].eval())
    with pytest.raises(ValueError) as error:
        pipe(**kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_bad_pipeline_components_are_one_line_errors():
    models = tiny_models()
    for build, message in [
        (lambda: GANPipeline(torch.nn.Linear(2, 2)), "generator must be a GAN generator"),
        (lambda: GANPipeline(models["dcgan"], models["projection-sn"]), "the discriminator has num_classes=3, the generator None"),
        (lambda: GANPipeline(models["dcgan"], class_names=["a", "b"]), "class_names given, but the generator is unconditional"),
        (lambda: GANPipeline(models["dcgan-conditional"], class_names=["a", "a", "b"]), "class_names must be 3 unique"),
    ]:
        with pytest.raises(ValueError) as error:
            build()
        assert str(error.value).startswith(message) and "\n" not in str(error.value)


NO_HFX_CALL = NO_HFX.format(call="pipe(class_labels=[0, 2, 1], truncation_psi=0.7, "
                                   "generator=torch.Generator().manual_seed(0), output_type='pt').images")


def test_the_remote_code_export_samples_the_same_images_where_hfx_cannot_be_imported(tmp_path):
    from hfx.hub.export import export_remote_code

    pipe = conditional_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    export_remote_code(tmp_path / "pipe", tmp_path / "export")
    assert (tmp_path / "export" / "generator" / "stylegan_gan.py").is_file()
    subprocess.run([sys.executable, "-c", NO_HFX_CALL, str(tmp_path / "export"), str(tmp_path / "out.pt")], check=True,
                   capture_output=True, timeout=120, cwd=tmp_path)
    exported = torch.load(tmp_path / "out.pt", weights_only=True)
    assert exported["type"] == "GANPipeline"
    assert torch.equal(exported["images"], images(pipe, class_labels=[0, 2, 1], truncation_psi=0.7))


def test_hfx_sample_writes_a_grid_of_a_gan_pipeline(tmp_path, capsys):
    from PIL import Image

    from hfx.cli import main

    conditional_pipeline().save_pretrained(tmp_path / "cond")
    out = tmp_path / "rows.png"
    assert main(["sample", str(tmp_path / "cond"), "--class", "two", "0", "--n", "3", "--truncation-psi", "0.7",
                 "--seed", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (24, 16) and "wrote" in capsys.readouterr().out  # a row per class, 3 columns
    pipe = GANPipeline.from_pretrained(tmp_path / "cond")  # the grid holds exactly the pipeline's images
    expected = pipe(class_labels=[2, 2, 2, 0, 0, 0], truncation_psi=0.7, generator=torch.Generator().manual_seed(1)).images
    grid = np.asarray(Image.open(out))
    assert np.array_equal(grid[8:16, 16:24, 0], np.asarray(expected[5]))  # make_image_grid writes RGB

    GANPipeline(tiny_models()["dcgan"].eval()).save_pretrained(tmp_path / "uncond")
    assert main(["sample", str(tmp_path / "uncond"), "--n", "5", "--out", str(out)]) == 0
    assert Image.open(out).size == (16, 24)  # 5 images in 3 rows of 2, the last cell blank
    for argv, message in [
        (["--class", "1"], "--class given, but"),
        (["--guidance", "2"], "--guidance applies to diffusion pipelines;"),
        (["--steps", "10"], "--steps applies to diffusion pipelines;"),
        (["--truncation-psi", "0.5"], "truncation_psi=0.5 needs a generator with a mapping network"),
    ]:
        assert main(["sample", str(tmp_path / "uncond"), *argv, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
