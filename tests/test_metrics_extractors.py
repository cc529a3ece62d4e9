"""Feature extractors, LPIPS and CLIP score: weights from local files reload exactly, every score records
what defines it, and the scores equal independent computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from hfx.metrics.extractors import (
    RANDOM_INIT,
    InceptionFeatureExtractor,
    ModuleFeatureExtractor,
    OpenClipFeatureExtractor,
    TimmFeatureExtractor,
    file_fingerprint,
    load_extractor,
    to_pixels,
)


def random_images(n: int, size: int = 40, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


# ----------------------------------------------------------------------------------------- inception
def test_fid_inception_reloads_from_a_local_file_and_records_its_identity(tmp_path):
    from torchvision.models.inception import Inception3

    with pytest.warns(UserWarning, match="random weights"):
        random_net = InceptionFeatureExtractor()
    assert random_net.describe() == {"extractor": "inception-v3-fid", "weights": RANDOM_INIT,
                                     "resize": "bilinear to 299x299", "feature_dim": 2048}
    # pytorch-fid's pt_inception-2015-12-05 file uses torchvision's names (1008 classes, no aux head).
    torchvision_keys = set(Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict())
    assert set(random_net.network.state_dict()) == torchvision_keys
    state = {k: v for k, v in random_net.network.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_inception.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "pt_inception.safetensors"))

    # pytorch-fid's preprocessing: [0, 1] -> bilinear resize to 299 (align_corners=False) -> 2x - 1.
    images = random_images(2, size=64)
    expected_pixels = 2 * F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(random_net.preprocess(images), expected_pixels)
    # The network takes any size >= 75: compare the weights at 80 px, a fraction of a 299 px pass.
    small = torch.rand(2, 3, 80, 80) * 2 - 1
    with torch.no_grad():
        expected = random_net.network(small)
    assert expected[0].shape == (2, 2048) and expected[1].shape == (2, 1008)
    with torch.no_grad():
        for path in (tmp_path / "pt_inception.pth", tmp_path / "pt_inception.safetensors"):
            loaded = InceptionFeatureExtractor(path)
            assert loaded.weights == file_fingerprint(path) != RANDOM_INIT
            for got, want in zip(loaded.network(small), expected):
                torch.testing.assert_close(got, want, rtol=0, atol=0)

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth is not an FID Inception-v3 state dict"):
        InceptionFeatureExtractor(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        InceptionFeatureExtractor(tmp_path / "missing.pth")


def test_fid_inception_uses_tensorflow_pooling():
    """The FID blocks' average pooling ignores padding: a constant image has constant pooled maps."""
    from hfx.metrics.inception import _avg_pool_without_padding

    pooled = _avg_pool_without_padding(torch.ones(1, 1, 4, 4))
    assert torch.equal(pooled, torch.ones(1, 1, 4, 4))
    assert F.avg_pool2d(torch.ones(1, 1, 4, 4), 3, 1, 1)[0, 0, 0, 0] < 1  # torchvision's default would not


# ---------------------------------------------------------------------------------------------- timm
def test_timm_extractor_reloads_weights_and_gives_logits(tmp_path):
    from timm.data import resolve_data_config

    with pytest.warns(UserWarning, match="random weights"):
        random_net = TimmFeatureExtractor("test_resnet")
    save_file({k: v.contiguous() for k, v in random_net.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = load_extractor(f"timm:test_resnet:{tmp_path / 'w.safetensors'}")
    images = random_images(3, channels=1)  # grey images are repeated to three channels
    expected, got = random_net(images), loaded(images)
    torch.testing.assert_close(got["features"], expected["features"], rtol=0, atol=0)
    assert got["logits"].shape == (3, 1000)
    # Independent: timm's own forward on the resized, normalised images equals the logits.
    config = resolve_data_config({}, model=loaded.model)  # test_resnet: bilinear, mean = std = 0.5, 160 px
    pixels = F.interpolate(images.float().expand(-1, 3, -1, -1) / 255, size=config["input_size"][1:],
                           mode=config["interpolation"], antialias=True, align_corners=False)
    mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], loaded.model((pixels - mean) / std), rtol=1e-5, atol=1e-5)
    # The same images as floats in [0, 1] give the same features (uint8 is divided by 255).
    torch.testing.assert_close(loaded(images.float() / 255)["features"], got["features"])
    assert loaded.describe() == {"extractor": "timm:test_resnet", "weights": file_fingerprint(tmp_path / "w.safetensors"),
                                 "resize": "bilinear-antialias to 160x160", "feature_dim": got["features"].shape[1]}
    with pytest.raises(ValueError, match="timm cannot build 'no_such_net'"):
        TimmFeatureExtractor("no_such_net")


def test_timm_local_dir_classifier_uses_its_recorded_preprocessing(tmp_path):
    """A classifier saved as hfx's image-classification task saves timm models: timm's Hub layout plus
    hfx_preprocessing.json (16x16 grey digits, mean = std = 0.5)."""
    import timm
    from timm.models._hub import save_config_for_hf

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    save_config_for_hf(model, str(tmp_path / "config.json"), model_args={"in_chans": 1, "num_classes": 10})
    (tmp_path / "hfx_preprocessing.json").write_text(json.dumps({"image_size": 16, "mode": "L", "mean": 0.5,
                                                                 "std": 0.5}))
    extractor = load_extractor(f"timm:local-dir:{tmp_path}")
    digits = random_images(4, size=16, channels=1)
    got = extractor(digits)
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features((digits.float() / 255 - 0.5) / 0.5), pre_logits=True)
    torch.testing.assert_close(got["features"], pre_logits)
    torch.testing.assert_close(got["logits"], model.get_classifier()(pre_logits))
    assert extractor.describe()["weights"] == file_fingerprint(tmp_path / "model.safetensors")
    assert extractor.describe()["resize"] == "bilinear-antialias to 16x16"


# ------------------------------------------------------------------------------------------ modules
def test_module_extractor_for_plain_module_and_pretrained_model(tmp_path):
    import transformers

    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    extractor = ModuleFeatureExtractor(net, name="mlp", weights="test", image_size=8, channels=1, mean=(0.5,),
                                       std=(0.5,), outputs_are_logits=True)
    images = random_images(4, size=8, channels=1)
    out = extractor(images)
    torch.testing.assert_close(out["features"], net((images.float() / 255 - 0.5) / 0.5))
    assert torch.equal(out["features"], out["logits"]) and extractor.feature_dim == 5

    config = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=10, image_size=16)
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "clf")
    hf = load_extractor(f"hf:{tmp_path / 'clf'}")
    digits = random_images(3, size=16, channels=3)  # colour images are turned into one grey channel
    got = hf(digits)
    grey = (digits.float() / 255 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    with torch.no_grad():
        reference = hf.module(pixel_values=(grey - 0.5) / 0.5, output_hidden_states=True)
    torch.testing.assert_close(got["logits"], reference.logits)
    torch.testing.assert_close(got["features"], reference.hidden_states[-1].mean(dim=(2, 3)))
    assert hf.describe()["weights"] == file_fingerprint(tmp_path / "clf" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_extractor(f"hf:{tmp_path}")


def test_image_inputs_are_checked_and_converted():
    from PIL import Image

    arrays = np.random.default_rng(0).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    from_pil = to_pixels([Image.fromarray(a) for a in arrays])
    torch.testing.assert_close(from_pil, to_pixels(arrays))
    assert from_pil.shape == (2, 3, 5, 6) and from_pil.max() <= 1
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\], got values in \[-1"):
        to_pixels(torch.full((1, 3, 4, 4), -1.0))
    with pytest.raises(ValueError, match="unknown extractor kind 'vgg'"):
        load_extractor("vgg:16")


# --------------------------------------------------------------------------------- open_clip / CLIP
@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("tiny_clip")
    config = {"model_cfg": {"embed_dim": 16,
                            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}},
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                                 "interpolation": "bicubic"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = open_clip.CLIP(**config["model_cfg"]).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder, model, config


def test_open_clip_extractor_and_clip_score_equal_direct_open_clip(tiny_open_clip):
    import open_clip

    from hfx.metrics.clip_score import CLIPScore, clip_score_from_embeddings

    folder, model, config = tiny_open_clip
    images = random_images(6, size=48)
    texts = ["a cat", "a dog", "a seven", "a red car", "the sea", "two apples"]
    pixels = F.interpolate(images.float() / 255, size=(32, 32), mode="bicubic", antialias=True,
                           align_corners=False).clamp(0, 1)
    mean, std = (torch.tensor(config["preprocess_cfg"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        image_embeds = model.encode_image((pixels - mean) / std)
        text_embeds = model.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(texts))

    extractor = OpenClipFeatureExtractor(f"local-dir:{folder}")
    torch.testing.assert_close(extractor(images)["features"], image_embeds, rtol=1e-5, atol=1e-5)
    assert extractor.describe()["weights"] == file_fingerprint(folder / "open_clip_model.safetensors")

    cosine = F.cosine_similarity(image_embeds.double(), text_embeds.double())
    expected = 100 * cosine.clamp(min=0)
    scorer = CLIPScore(f"local-dir:{folder}")
    torch.testing.assert_close(scorer(images, texts), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(clip_score_from_embeddings(torch.ones(2, 3), torch.tensor([[1.0, 1, 1], [-1, -1, -1]])),
                               torch.tensor([100.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="got 6 images and 2 texts"):
        scorer(images, texts[:2])


# ---------------------------------------------------------------------------------------------- LPIPS
def lpips_reference(trunk_layers, taps, heads, a, b):
    """LPIPS written out independently: tap the trunk, unit-normalise channels, weight, spatial mean, sum."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps_of(x):
        x, found = (x - shift) / scale, []
        for index, layer in enumerate(trunk_layers):
            x = layer(x)
            if index in taps:
                found.append(x.clone())
        return found

    total = torch.zeros(a.shape[0])
    for fa, fb, w in zip(taps_of(a), taps_of(b), heads):
        na = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        nb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        total += torch.einsum("bchw,c->bhw", (na - nb) ** 2, w).mean(dim=(1, 2))
    return total


def test_lpips_equals_reference_with_paper_format_heads_and_local_trunk(tmp_path):
    from torchvision.models import alexnet

    from hfx.metrics.lpips import LPIPS, UNLEARNED_HEADS

    torch.manual_seed(0)
    trunk = alexnet(weights=None)
    torch.save(trunk.state_dict(), tmp_path / "alexnet.pth")
    channels = [64, 192, 384, 256, 256]
    heads = [torch.rand(c) for c in channels]
    # The lpips package's v0.1 file layout: lin<i>.model.1.weight of shape [1, C, 1, 1].
    torch.save({f"lin{i}.model.1.weight": h.view(1, -1, 1, 1) for i, h in enumerate(heads)}, tmp_path / "alex.pth")

    metric = LPIPS("alex", trunk_weights=tmp_path / "alexnet.pth", heads=tmp_path / "alex.pth")
    a = torch.rand(3, 3, 64, 64) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    with torch.no_grad():
        expected = lpips_reference(trunk.features.eval(), (1, 4, 7, 9, 11), heads, a, b)
    torch.testing.assert_close(metric(a, b), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metric(b, a), metric(a, b), rtol=1e-6, atol=1e-7)
    assert metric(a, a).abs().max() == 0
    assert metric.describe() == {"lpips_net": "alex", "trunk_weights": file_fingerprint(tmp_path / "alexnet.pth"),
                                 "heads": file_fingerprint(tmp_path / "alex.pth")}
    # Heads written by hfx load back into a fresh metric and give the same distances.
    metric.save_heads(tmp_path / "heads.safetensors")
    again = LPIPS("alex", trunk_weights=tmp_path / "alexnet.pth", heads=tmp_path / "heads.safetensors")
    torch.testing.assert_close(again(a, b), metric(a, b), rtol=0, atol=0)

    with pytest.warns(UserWarning, match="no learned heads"):
        unlearned = LPIPS("alex", trunk_weights=tmp_path / "alexnet.pth")
    assert unlearned.describe()["heads"] == UNLEARNED_HEADS
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth has heads \[0\]; LPIPS\(alex\) needs lin0..lin4"):
        LPIPS("alex", trunk_weights=tmp_path / "alexnet.pth", heads=tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="unknown LPIPS trunk 'squeeze'"):
        LPIPS("squeeze")


def test_lpips_timm_trunk_runs_and_warns_about_random_weights():
    from hfx.metrics.lpips import LPIPS

    with pytest.warns(UserWarning) as warned:
        metric = LPIPS("timm:test_resnet")
    messages = " | ".join(str(w.message) for w in warned)
    assert "uses a random trunk" in messages and "uses no learned heads" in messages
    a, b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1  # grey images are fine
    distances = metric(a, b)
    assert distances.shape == (2,) and (distances > 0).all() and metric(a, a).abs().max() == 0
    assert metric.describe()["trunk_weights"] == RANDOM_INIT


def test_fid_inception_equals_pytorch_fid_bit_for_bit(tmp_path):
    """Same weights -> the same pool3 features as pytorch-fid's InceptionV3 (its resize, its FID blocks).

    pytorch-fid is not an hfx dependency (``.venv/bin/pip install --no-deps pytorch-fid`` to run this);
    its own constructor would download weights, so its FID network is assembled here from its blocks.
    """
    pf = pytest.importorskip("pytorch_fid.inception")
    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b, net.Mixed_5c = pf.FIDInceptionA(192, pool_features=32), pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b, net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=128), pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d, net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=160), pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b, net.Mixed_7c = pf.FIDInceptionE_1(1280), pf.FIDInceptionE_2(2048)
    torch.manual_seed(0)
    for module in net.modules():  # non-trivial batch-norm statistics, so every block matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(net.eval().state_dict(), tmp_path / "weights.pth")
    original, pf.fid_inception_v3 = pf.fid_inception_v3, lambda: net
    try:
        theirs = pf.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    finally:
        pf.fid_inception_v3 = original
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(images)[0].flatten(1)
    torch.testing.assert_close(InceptionFeatureExtractor(tmp_path / "weights.pth")(images)["features"], expected,
                               rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*deprecated since 0.13:UserWarning")  # the lpips package's torchvision call
def test_lpips_equals_the_lpips_package_with_its_learned_heads(tmp_path):
    """The paper's code (``lpips`` package) and its shipped v0.1 heads, same trunk weights: equal distances.

    Not an hfx dependency (``.venv/bin/pip install --no-deps lpips`` to run this); the trunk is random
    because ImageNet weights cannot be downloaded here (``pnet_rand=True``).
    """
    import os

    lpips = pytest.importorskip("lpips")
    from hfx.metrics.lpips import LPIPS

    torch.manual_seed(0)
    reference = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    # lpips keeps torchvision's `features` indices inside its slices: slice<k>.<index>.<weight|bias>
    trunk = {f"{name.split('.')[1]}.{name.split('.')[2]}": p.detach() for name, p in reference.net.named_parameters()}
    torch.save(trunk, tmp_path / "alexnet_features.pth")
    heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    metric = LPIPS("alex", trunk_weights=tmp_path / "alexnet_features.pth", heads=heads)
    a = torch.rand(3, 3, 64, 64) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    with torch.no_grad():
        expected = reference(a, b).flatten()
    torch.testing.assert_close(metric(a, b), expected, rtol=1e-6, atol=1e-7)
