"""hfx.interpret: every method on a timm ResNet, a timm ViT, a transformers ViT, a BERT classifier, a Llama
classifier and hfx's LM, without a reshape function; the model left as it came; errors that name the bad
input; receptive fields against a gradient probe; the Grad-CAM grid of a classifier's card."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from hfx.interpret import METHODS, explain, overlay, receptive_field

IMAGE_METHODS = ["saliency", "smoothgrad", "guided_backprop", "deconvnet", "cam", "gradcam", "guided_gradcam"]
FAST = {"smoothgrad": {"samples": 3}}


@pytest.fixture(scope="module")
def resnet():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10, channels=[8, 16, 32, 64], stem_width=8).eval()


@pytest.fixture(scope="module")
def timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()


@pytest.fixture(scope="module")
def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)
    return ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def hfx_lm():
    from hfx.models.lm import HfxLMConfig, HfxLMForCausalLM

    torch.manual_seed(0)
    config = HfxLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return HfxLMForCausalLM(config).eval()


def tokens(vocab: int = 50, pad: int = 0):
    ids = torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = pad, 0
    return {"input_ids": ids, "attention_mask": mask}


def images(size: int = 32, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_every_image_method_on_a_timm_resnet(resnet, method):
    x = images(64)
    explanation = explain(resnet, x, method=method, **FAST.get(method, {}))
    heat = explanation.heatmaps
    assert heat.shape == (3, 64, 64) and heat.min() == 0 and heat.max() == 1
    assert torch.equal(explanation.target, resnet(x).argmax(-1))  # target=None: the predicted class
    assert explanation.layer == ("layer4" if "cam" in method else None)


def test_gradcam_picks_the_last_map_larger_than_1x1(resnet):
    """On 16x16 digits resnet10t's layer3 and layer4 are 1x1: Grad-CAM falls back to layer2 (2x2), CAM refuses."""
    x = torch.randn(2, 3, 16, 16)
    assert explain(resnet, x, "gradcam").layer == "layer2"
    with pytest.raises(ValueError, match=r"'layer4'\) is 1x1"):
        explain(resnet, x, "cam")


def test_cam_equals_gradcam_for_a_global_average_pool_and_linear_head(resnet):
    """Selvaraju et al. sec. 3.1: with GAP + one linear layer Grad-CAM's weights are CAM's divided by h*w."""
    x = images(64)
    a, b = explain(resnet, x, "cam", target=[1, 2, 3]), explain(resnet, x, "gradcam", target=[1, 2, 3])
    assert (a.heatmaps - b.heatmaps).abs().max() < 1e-5
    assert a.attributions.shape == (3, 2, 2)  # the layer's resolution


def test_cam_refuses_a_head_that_is_not_gap_and_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    with pytest.raises(ValueError, match="one linear layer on the global average"):
        explain(model, torch.randn(2, 3, 8, 8), "cam")
    assert explain(model, torch.randn(2, 3, 8, 8), "gradcam").layer == "1"  # the last feature map: the ReLU's


def test_smoothgrad_without_noise_is_saliency(resnet):
    x = images(32)
    plain = explain(resnet, x, "saliency")
    smooth = explain(resnet, x, "smoothgrad", samples=2, noise=0.0)
    torch.testing.assert_close(smooth.attributions, plain.attributions, rtol=0, atol=1e-7)


def test_guided_gradcam_is_guided_backprop_times_gradcam(resnet):
    x = images(64)
    guided = explain(resnet, x, "guided_backprop", target=4).attributions
    cam = explain(resnet, x, "gradcam", target=4).heatmaps
    torch.testing.assert_close(explain(resnet, x, "guided_gradcam", target=4).attributions, guided * cam[:, None])


def test_guided_backprop_and_deconvnet_differ_from_the_gradient(resnet):
    x = images(64)
    grad = explain(resnet, x, "saliency", target=0).attributions
    guided = explain(resnet, x, "guided_backprop", target=0).attributions
    deconv = explain(resnet, x, "deconvnet", target=0).attributions
    assert not torch.allclose(guided.abs(), grad) and not torch.allclose(deconv, guided)


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit"])
@pytest.mark.parametrize("method", ["saliency", "gradcam", "guided_backprop", "attention", "attention_rollout"])
def test_vision_transformers_need_no_reshape_function(request, name, method):
    model = request.getfixturevalue(name)
    explanation = explain(model, images(32, 2), method=method)
    expected = {"attention": (2, 2, 2, 32, 32)}.get(method, (2, 32, 32))
    assert explanation.heatmaps.shape == expected
    if method == "gradcam":
        assert explanation.layer == {"timm_vit": "blocks.1.norm1", "hf_vit": "vit.layers.1.layernorm_before"}[name]
        assert explanation.attributions.shape == (2, 4, 4)  # 32 / 8 patches a side, class token dropped


@pytest.mark.parametrize("model_type, options, layer, grid", [
    ("resnet", {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"},
     "resnet.encoder.stages.1", (2, 2)),
    ("convnext", {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2, "patch_size": 2}, "convnext.encoder.stages.1", (4, 4)),
    ("deit", {"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32}, "deit.layers.0.layernorm_before", (4, 4)),  # class + distillation token
    ("swin", {"image_size": 16, "patch_size": 2, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 1], "window_size": 2},
     "swin.encoder.layers.1.blocks.0.layernorm_before", (4, 4)),  # after patch merging: 8x8 -> 4x4 tokens, no prefix
])
def test_transformers_image_classifiers_built_from_config(model_type, options, layer, grid):
    """What ``task_options.model=<model type>`` builds; their vision models raise from get_input_embeddings."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, num_labels=3, num_channels=1, **options)
    cls = transformers.DeiTForImageClassification if model_type == "deit" else transformers.AutoModelForImageClassification
    model = (cls(config) if model_type == "deit" else cls.from_config(config)).eval()
    x = torch.randn(2, 1, 16, 16)
    explanation = explain(model, x, "gradcam")
    assert explanation.layer == layer and explanation.attributions.shape == (2, *grid)
    for method in ("saliency", "guided_backprop"):
        assert explain(model, x, method).heatmaps.shape == (2, 16, 16)


def test_vit_token_grid_with_register_tokens():
    """timm's num_prefix_tokens (class + register tokens) is what is dropped before the reshape."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                              reg_tokens=2).eval()
    assert model.num_prefix_tokens == 3
    assert explain(model, images(32, 2), "gradcam").attributions.shape == (2, 4, 4)
    assert explain(model, images(32, 2), "attention_rollout").heatmaps.shape == (2, 32, 32)


def test_attention_maps_equal_the_models_own(timm_vit, hf_vit):
    """transformers: its eager output_attentions; timm: softmax(q k^T / sqrt(d)) from the block's own qkv."""
    x = images(32, 2)
    ours = explain(hf_vit, x, "attention").attributions
    reference = copy.deepcopy(hf_vit)
    reference.set_attn_implementation("eager")
    theirs = torch.stack(reference(x, output_attentions=True).attentions, 1)
    torch.testing.assert_close(ours, theirs)

    ours = explain(timm_vit, x, "attention").attributions
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in timm_vit.blocks]
    with torch.no_grad():
        timm_vit(x)
    for h in hooks:
        h.remove()
    for layer, (block, tokens_in) in enumerate(zip(timm_vit.blocks, inputs)):
        q, k, _ = block.attn.qkv(tokens_in).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        torch.testing.assert_close(ours[:, layer], (q @ k.transpose(-2, -1) * 16 ** -0.5).softmax(-1))


def test_attention_rollout_is_the_product_of_residual_attention(hf_vit):
    x = images(32, 2)
    maps = explain(hf_vit, x, "attention").attributions  # (B, L, heads, N, N)
    eye = torch.eye(maps.shape[-1])
    a = [(m.mean(1) + eye) / (m.mean(1) + eye).sum(-1, keepdim=True) for m in maps.unbind(1)]
    torch.testing.assert_close(explain(hf_vit, x, "attention_rollout").attributions, a[1] @ a[0])


# ---------------------------------------------------------------------------------------------- text
def test_text_saliency_is_the_embedding_gradient_norm(bert):
    batch = tokens()
    explanation = explain(bert, batch, "saliency", target=[2, 0])
    embeds = bert.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    logits = bert(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    (grad,) = torch.autograd.grad(logits[0, 2] + logits[1, 0], embeds)
    norm = grad.norm(dim=-1)
    expected = (norm - norm[1, :5].min()) / (norm[1, :5].max() - norm[1, :5].min())
    torch.testing.assert_close(explanation.heatmaps[1, :5], expected[1, :5])
    assert explanation.heatmaps.shape == (2, 7) and (explanation.heatmaps[1, 5:] == 0).all()


@pytest.mark.parametrize("method", ["saliency", "smoothgrad", "attention", "attention_rollout"])
def test_text_methods_on_bert_and_hfx_lm(bert, hfx_lm, method):
    for model, vocab in ((bert, 50), (hfx_lm, 64)):
        explanation = explain(model, tokens(vocab), method, **FAST.get(method, {}))
        expected = (2, 2, 2, 7, 7) if method == "attention" else (2, 7)
        assert explanation.heatmaps.shape == expected


def test_causal_lm_explains_the_next_token_after_the_last_real_one(hfx_lm):
    batch = tokens(64)
    with torch.no_grad():
        logits = hfx_lm(**batch).logits
    explanation = explain(hfx_lm, batch, "saliency")
    assert explanation.target.tolist() == [int(logits[0, 6].argmax()), int(logits[1, 4].argmax())]
    attention = explain(hfx_lm, batch, "attention").heatmaps
    assert attention[0].triu(1).abs().max() == 0  # causal maps come back as they are
    rollout = explain(hfx_lm, batch, "attention_rollout").attributions
    scores = explain(hfx_lm, batch, "attention_rollout").heatmaps
    row = rollout[1, 4, :5]  # the readout of row 1 is its last real token, 4
    torch.testing.assert_close(scores[1, :5], (row - row.min()) / (row.max() - row.min()))


def test_llama_classifier_reads_its_last_real_token():
    """Saliency calls the model on input_ids (a hook swaps the embeddings), so a Llama classifier still
    finds the padding; through inputs_embeds it would read the pad position."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=2, pad_token_id=0)).eval()
    batch = tokens(64, pad=0)
    heat = explain(model, batch, "saliency").heatmaps
    assert heat.shape == (2, 7) and heat[1, :5].max() == 1 and (heat[1, 5:] == 0).all()
    short = {k: v[1:, :5] for k, v in batch.items()}  # the same row without its padding
    torch.testing.assert_close(explain(model, short, "saliency").heatmaps[0], heat[1, :5])


# ---------------------------------------------------------------------------------------------- state
def snapshot(model: nn.Module) -> dict:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                + len(m._backward_pre_hooks) for m in model.modules())
    return {"training": [m.training for m in model.modules()], "requires_grad": [p.requires_grad for p in model.parameters()],
            "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()], "hooks": hooks,
            "fused": [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")],
            "attn": getattr(getattr(model, "config", None), "_attn_implementation", None),
            "weights": {k: v.clone() for k, v in model.state_dict().items()}}


def assert_same(before: dict, after: dict) -> None:
    for key in ("training", "requires_grad", "hooks", "fused", "attn"):
        assert before[key] == after[key], key
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before["grad"], after["grad"]))
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])


@pytest.mark.parametrize("name", ["resnet", "timm_vit", "hf_vit", "bert", "hfx_lm"])
def test_the_model_comes_back_as_it_was(request, name):
    model = copy.deepcopy(request.getfixturevalue(name)).train()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[-1].grad = torch.ones_like(params[-1])
    before = snapshot(model)
    text = name in ("bert", "hfx_lm")
    inputs = tokens(64 if name == "hfx_lm" else 50) if text else images(64 if name == "resnet" else 32, 2)
    for method, spec in METHODS.items():
        if ("text" if text else "image") in spec.inputs and not (method == "cam" and "vit" in name) and \
                not ("attention" in method and name == "resnet"):
            explain(model, inputs, method, **FAST.get(method, {}))
        assert_same(before, snapshot(model))


def test_guided_backprop_leaves_the_plain_gradient_unchanged(resnet):
    x = images(32, 2).requires_grad_()
    before = torch.autograd.grad(resnet(x)[:, 3].sum(), x)[0]
    explain(resnet, x.detach(), "guided_backprop")
    after = torch.autograd.grad(resnet(x)[:, 3].sum(), x)[0]
    assert torch.equal(before, after)


def test_explain_turns_gradients_on_under_no_grad_and_inference_mode(resnet, bert):
    x = images(32, 2)
    reference = explain(resnet, x, "gradcam").heatmaps
    with torch.no_grad():
        assert torch.equal(explain(resnet, x, "gradcam").heatmaps, reference)
    with torch.inference_mode():
        x_inference = images(32, 2)
        assert torch.equal(explain(resnet, x_inference, "gradcam").heatmaps, reference)
        explain(bert, tokens(), "saliency")


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, message", [
    (lambda r, b: explain(r, images(), method="gradcm"), r"method 'gradcm' is not one of: saliency.*did you mean 'gradcam'\?"),
    (lambda r, b: explain(r, images(), target=10), r"target 10 is out of range: the model has 10 classes \(0\.\.9\)"),
    (lambda r, b: explain(r, images(), target=-1), r"target -1 is out of range"),
    (lambda r, b: explain(r, images(), target=[1, 2]), r"target: give one class id or one per input \(3\), got 2"),
    (lambda r, b: explain(r, images(), layer="layer5"), r"layer 'layer5' is not a module of ResNet; did you mean 'layer4'"),
    (lambda r, b: explain(r, images(), "saliency", layer="layer4"), r"layer= applies to cam, gradcam, guided_gradcam"),
    (lambda r, b: explain(r, images(), "smoothgrad", sample=3), r"no option 'sample' \(its options: samples, noise, seed\)"),
    (lambda r, b: explain(r, images(), "attention"), r"need a model with attention layers; ResNet returned no attention"),
    (lambda r, b: explain(r, images(), "attention_rollout", head_fusion="median"), r"head_fusion 'median'"),
    (lambda r, b: explain(b, tokens(), "gradcam"), r"method 'gradcam' explains images .* use one of: saliency, smoothgrad, attention"),
    (lambda r, b: explain(b, images(), "saliency"), r"inputs are images .* BertForSequenceClassification is a text model"),
    (lambda r, b: explain(r, tokens(), "saliency"), r"ResNet has no get_input_embeddings"),
    (lambda r, b: explain(r, {"pixel_values": images()}), r"a mapping needs 'input_ids' \(got keys: pixel_values\)"),
    (lambda r, b: explain(r, torch.randn(2, 3)), r"images must be \(B, C, H, W\)"),
])
def test_errors_name_the_bad_input(resnet, bert, call, message):
    with pytest.raises(ValueError, match=message) as caught:
        call(resnet, bert)
    assert "\n" not in str(caught.value)


def test_guided_backprop_refuses_a_model_without_activation_modules():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    with pytest.raises(ValueError, match="no activation modules to rectify"):
        explain(Functional(), torch.randn(1, 3, 8, 8), "guided_backprop")


# ---------------------------------------------------------------------------------------------- overlay
def test_overlay_blends_a_colormap_over_the_image():
    import matplotlib
    import numpy as np

    image = torch.rand(1, 8, 8)  # greyscale (C, H, W) in [0, 1]
    heat = torch.linspace(0, 1, 16).reshape(4, 4)
    out = overlay(image, heat, alpha=0.5)
    assert out.mode == "RGB" and out.size == (8, 8)
    plain = np.asarray(overlay(image, heat, alpha=0.0), dtype=np.float32) / 255
    np.testing.assert_allclose(plain, image[0, :, :, None].expand(8, 8, 3).numpy(), atol=1 / 255)
    colours = np.asarray(overlay(image, torch.ones(8, 8), alpha=1.0, colormap="viridis"))
    assert (colours == np.round(np.array(matplotlib.colormaps["viridis"](1.0)[:3]) * 255)).all()
    with pytest.raises(ValueError, match="colormap 'jett' is not a matplotlib colormap; did you mean 'jet'"):
        overlay(image, heat, colormap="jett")


# ---------------------------------------------------------------------------------------------- receptive field
def probe_receptive_field(model: nn.Module, layer: str, size: int) -> tuple[int, int]:
    """The receptive field seen by gradients: d (centre unit of ``layer``) / d input on a copy of the model
    whose paths all carry signal (positive conv weights, identity batch norms, positive input) and whose max
    pools are average pools (same geometry; a max pool's gradient reaches one pixel per window). Size: the
    extent of the nonzero gradient; stride: its shift between two neighbouring units."""
    probe = copy.deepcopy(model).eval()
    for parent in list(probe.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, child_name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
    with torch.no_grad():
        for module in probe.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.abs_().add_(0.01)
                if module.bias is not None:
                    module.bias.zero_()
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_(), module.running_var.fill_(1.0), module.weight.fill_(1.0), module.bias.zero_()
    outputs = []
    handle = probe.get_submodule(layer).register_forward_hook(lambda m, a, out: outputs.append(out))
    channels = next(m for m in probe.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.ones(1, channels, size, size, requires_grad=True)
    probe(x)
    handle.remove()
    out = outputs[-1]
    h, w = out.shape[-2] // 2, out.shape[-1] // 2
    extents = []
    for column in (w, w + 1):
        (grad,) = torch.autograd.grad(out[0, :, h, column].sum(), x, retain_graph=True)
        cols = (grad[0].abs().sum(0) > 0).any(0).nonzero()[:, 0]
        extents.append((int(cols.min()), int(cols.max())))
    return extents[0][1] - extents[0][0] + 1, extents[1][0] - extents[0][0]


def test_receptive_field_matches_a_gradient_probe(resnet):
    stack = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=2, dilation=2),
                          nn.ReLU(), nn.AvgPool2d(3, stride=2, padding=1), nn.Conv2d(4, 4, 5, stride=2, padding=2))
    for index in ("0", "2", "3", "5", "6"):
        assert receptive_field(stack, index, image_size=96) == probe_receptive_field(stack, index, 96), index
    assert receptive_field(stack, "6") == (1 + 2 + 1 + 2 * 2 * 2 + 2 * 2 + 4 * 4, 8)  # the recurrence by hand: 32
    for layer in ("conv1", "maxpool", "layer1", "layer2", "layer3"):  # residual blocks, a strided shortcut
        assert receptive_field(resnet, layer) == probe_receptive_field(resnet, layer, 256), layer


def test_receptive_field_of_resnet18_is_the_published_435():
    import timm

    assert receptive_field(timm.create_model("resnet18"), "layer4") == (435, 32)  # Araujo et al. 2019, table 1


def test_receptive_field_errors(resnet):
    with pytest.raises(ValueError, match="'fc' comes after a global pool"):
        receptive_field(resnet, "fc")
    with pytest.raises(ValueError, match="did you mean 'layer4'"):
        receptive_field(resnet, "layer9")
    upsampling = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 3))
    with pytest.raises(ValueError, match="goes through 'interpolate'"):
        receptive_field(upsampling, "2", image_size=16)


# ---------------------------------------------------------------------------------------------- the package
def test_interpret_is_a_leaf():
    """hfx.interpret imports third-party packages and itself only (ARCHITECTURE.md: leaves)."""
    folder = Path(__file__).resolve().parent.parent / "hfx" / "interpret"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name == "hfx.interpret" or name.startswith("hfx.interpret.") or not name.startswith("hfx"), \
                    f"{path.name} imports {name}"


def test_a_classifier_runs_card_shows_a_gradcam_grid(tmp_path):
    """A classify-digits run writes samples/gradcam-step-<n>.png at its evaluation; the card copies the newest
    into images/ and shows it. explain reads the saved artifact as TrainedImageClassifier loads it."""
    from PIL import Image

    from hfx.metrics.classifier import TrainedImageClassifier
    from hfx.trainers import train

    run = train("classify-digits", [f"output_dir={tmp_path}", "train.max_steps=3", "eval.every_steps=null",
                                    "checkpoint.every_steps=null", "log.report_to=[]", "data.max_eval_samples=16",
                                    "task_options.gradcam_grid=4"])
    grids = sorted((tmp_path / "samples").glob("gradcam-step-*.png"))
    assert [g.name for g in grids] == ["gradcam-step-0000003.png"]
    assert Image.open(grids[0]).size == (4 * 64, 64)  # 16 px digits upscaled 4x, one row
    card = (run.final_dir / "README.md").read_text()
    assert "](images/gradcam-step-0000003.png)" in card and (run.final_dir / "images" / grids[0].name).is_file()

    classifier = TrainedImageClassifier(run.final_dir)
    digits = classifier.normalise(torch.rand(2, 1, 16, 16) * 2 - 1)
    explanation = explain(classifier.model, digits, "gradcam")
    assert explanation.layer == "layer2" and explanation.heatmaps.shape == (2, 16, 16)
