"""hfx.interpret against the reference implementations, on the same models, inputs, layers and targets:
pytorch-grad-cam 1.5.7's ``GradCAM`` and captum 0.9's ``Saliency``, ``GuidedBackprop`` and ``Deconvolution``.

Tolerances (float32, CPU):

- Grad-CAM heatmaps: max |ours - pytorch-grad-cam| < 1e-5 (measured 2.4e-7 .. 1.5e-6: pytorch-grad-cam min-max
  normalises before and after its OpenCV resize, with a 1e-7 epsilon; we normalise once after a bilinear
  ``F.interpolate``, which computes what ``cv2.INTER_LINEAR`` does).
- captum attributions: max |ours - captum| <= 1e-6 * max |captum| (measured: 0, the same gradients); the
  heatmaps derived from them (max over channels, min-max) within 1e-6.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import Deconvolution, GuidedBackprop, Saliency
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from hfx.interpret import explain, normalise

TARGETS = [1, 5, 7]


@pytest.fixture(scope="module")
def resnet():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10, channels=[8, 16, 32, 64], stem_width=8).eval()


def pixels(size: int = 64) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))


def reference_gradcam(model, layer, x, targets, reshape=None):
    with GradCAM(model, [layer], reshape_transform=reshape) as cam:
        return torch.from_numpy(cam(x, [ClassifierOutputTarget(t) for t in targets]))


@pytest.mark.parametrize("layer", ["layer2", "layer3", "layer4"])
def test_gradcam_equals_pytorch_grad_cam_on_a_timm_resnet(resnet, layer):
    x = pixels()
    ours = explain(resnet, x, "gradcam", target=TARGETS, layer=layer)
    theirs = reference_gradcam(resnet, resnet.get_submodule(layer), x, TARGETS)
    assert ours.heatmaps.shape == theirs.shape == (3, 64, 64)
    assert (ours.heatmaps - theirs).abs().max() < 1e-5


def test_gradcam_default_layer_and_predicted_class_equal_pytorch_grad_cam(resnet):
    """pytorch-grad-cam with targets=None explains the argmax too; our default layer is layer4 at 64 px."""
    x = pixels()
    with GradCAM(resnet, [resnet.layer4]) as cam:
        theirs = torch.from_numpy(cam(x, None))
    assert (explain(resnet, x, "gradcam").heatmaps - theirs).abs().max() < 1e-5


def test_gradcam_on_vits_equals_pytorch_grad_cam_with_a_hand_written_reshape():
    """pytorch-grad-cam needs the reshape spelled out (its ViT tutorial's ``reshape_transform``); explain finds it."""
    from timm.models.vision_transformer import VisionTransformer
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    timm_vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    hf_vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64, num_labels=10)).eval()

    def reshape(tokens):  # drop the class token, 4 x 4 patches
        return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)

    class Logits(torch.nn.Module):  # pytorch-grad-cam wants a tensor out
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).logits

    x = pixels(32)
    theirs = reference_gradcam(timm_vit, timm_vit.blocks[-1].norm1, x, TARGETS, reshape)
    assert (explain(timm_vit, x, "gradcam", target=TARGETS).heatmaps - theirs).abs().max() < 1e-5
    theirs = reference_gradcam(Logits(hf_vit), hf_vit.vit.layers[-1].layernorm_before, x, TARGETS, reshape)
    assert (explain(hf_vit, x, "gradcam", target=TARGETS).heatmaps - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("method, reference", [
    ("saliency", lambda m, x, t: Saliency(m).attribute(x, target=t, abs=True)),
    ("guided_backprop", lambda m, x, t: GuidedBackprop(m).attribute(x, target=t)),
    ("deconvnet", lambda m, x, t: Deconvolution(m).attribute(x, target=t)),
])
def test_gradient_methods_equal_captum(resnet, method, reference):
    x = pixels()
    ours = explain(resnet, x, method, target=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum warns that it sets hooks on the ReLUs
        theirs = reference(resnet, x.clone().requires_grad_(), TARGETS).detach()
    assert (ours.attributions - theirs).abs().max() <= 1e-6 * theirs.abs().max()
    assert (ours.heatmaps - normalise(theirs.abs().amax(1))).abs().max() < 1e-6
    if method != "saliency":  # the rectified backward differs from the plain gradient
        assert not torch.allclose(ours.attributions, explain(resnet, x, "saliency", target=TARGETS).attributions)
