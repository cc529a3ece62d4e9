"""open_clip CLIP <-> transformers CLIPModel: same features and logits both ways, identical weights after a round
trip, the tokenizer and image processor, the folder layouts (``local-dir:``), the zero-shot pipeline, and the
open_clip options that are refused. Tiny random models, no network."""

import json
import math

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, CLIPConfig, CLIPModel, CLIPTokenizer, pipeline

from hfx.models.open_clip_conversion import (
    clip_config_from_open_clip,
    clip_image_processor,
    clip_tokenizer_from_open_clip,
    convert_clip_model_folder,
    convert_open_clip_folder,
    open_clip_bpe_vocab,
    open_clip_to_transformers,
    save_open_clip,
    save_vocab_files,
    transformers_to_open_clip,
)

CONTEXT = 16
VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
TEXT = {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TEXTS = ["a photo of a cat", "a diagram", "two dogs playing in the snow, 4k!", "it's", " ".join(["cat"] * 40)]


def tiny_model_cfg(quick_gelu=False, vision=None, text=None, **extra):
    return {"embed_dim": 32, "quick_gelu": quick_gelu, "vision_cfg": {**VISION, **(vision or {})},
            "text_cfg": {**TEXT, **(text or {})}, **extra}


def tiny_open_clip(seed=0, cls=open_clip.CLIP, **kwargs):
    torch.manual_seed(seed)
    model = cls(**tiny_model_cfg(**kwargs)).eval()
    with torch.no_grad():  # random LayerNorm affines so a swapped weight/bias or ln could not pass unnoticed
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
        model.logit_scale.fill_(math.log(30.0))
    return model


def tokens(texts=TEXTS):
    return open_clip.SimpleTokenizer(context_length=CONTEXT)(texts)


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_outputs(oc_model, hf_model, atol=1e-5):
    pixels, ids = images(), tokens()
    torch.testing.assert_close(hf_model.get_image_features(pixel_values=pixels).pooler_output,
                               oc_model.encode_image(pixels), atol=atol, rtol=0)
    torch.testing.assert_close(hf_model.get_text_features(input_ids=ids).pooler_output,
                               oc_model.encode_text(ids), atol=atol, rtol=0)
    logits, _ = oc_model.get_logits(pixels, ids)
    torch.testing.assert_close(hf_model(input_ids=ids, pixel_values=pixels).logits_per_image, logits,
                               atol=atol * 10, rtol=0)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_to_transformers_same_features_and_logits(quick_gelu):
    oc_model = tiny_open_clip(quick_gelu=quick_gelu)
    hf_model = open_clip_to_transformers(oc_model)
    assert isinstance(hf_model, CLIPModel)
    act = "quick_gelu" if quick_gelu else "gelu"
    assert hf_model.config.vision_config.hidden_act == hf_model.config.text_config.hidden_act == act
    assert hf_model.config.vision_config.num_attention_heads == 2
    assert hf_model.config.text_config.max_position_embeddings == CONTEXT
    assert hf_model.config.text_config.eos_token_id == 49407  # open_clip's <end_of_text>
    assert_same_outputs(oc_model, hf_model)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_round_trip_gives_identical_weights_and_config(quick_gelu):
    oc_model = tiny_open_clip(quick_gelu=quick_gelu)
    back, model_cfg = transformers_to_open_clip(open_clip_to_transformers(oc_model))
    assert model_cfg == {**tiny_model_cfg(quick_gelu=quick_gelu),
                         "vision_cfg": {**VISION, "mlp_ratio": 4.0}, "text_cfg": {**TEXT, "mlp_ratio": 4.0}}
    ours, theirs = oc_model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_transformers_to_open_clip_same_features_and_logits():
    torch.manual_seed(3)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": CONTEXT, "eos_token_id": 49407,
                     "hidden_act": "quick_gelu", "layer_norm_eps": 1e-6},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3,
                       "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-6},
        projection_dim=24,
    )
    hf_model = CLIPModel(config).eval()
    oc_model, model_cfg = transformers_to_open_clip(hf_model)
    assert model_cfg["quick_gelu"] is True
    assert model_cfg["vision_cfg"]["head_width"] == 16 and model_cfg["vision_cfg"]["mlp_ratio"] == 2.0
    assert model_cfg["text_cfg"]["norm_kwargs"] == {"eps": 1e-6}
    assert_same_outputs(oc_model, hf_model)
    again = open_clip_to_transformers(oc_model).state_dict()
    for key, value in hf_model.state_dict().items():
        assert torch.equal(again[key], value), key


def test_gelu_tanh_layer_scale_eos_pooling_and_custom_text_clip_convert():
    variants = [
        {"vision": {"act_kwargs": {"approximate": "tanh"}}, "text": {"act_kwargs": {"approximate": "tanh"}}},
        {"vision": {"ls_init_value": 0.5}, "text": {"ls_init_value": 0.3}},  # LayerScale folds into the linears
        {"text": {"pool_type": "eos", "eos_id": 49407}},
        {"cls": open_clip.CustomTextCLIP},
        {"vision": {"final_ln_after_pool": True}},  # LayerNorm is per token: same as before pooling
    ]
    for kwargs in variants:
        oc_model = tiny_open_clip(**kwargs)
        if "ls_init_value" in kwargs.get("vision", {}):
            with torch.no_grad():
                for name, param in oc_model.named_parameters():
                    if name.endswith("gamma"):
                        param.uniform_(0.2, 1.5)
        assert_same_outputs(oc_model, open_clip_to_transformers(oc_model))


def test_tokenizer_gives_open_clip_ids(tmp_path):
    vocab, merges = open_clip_bpe_vocab()
    simple = open_clip.SimpleTokenizer(context_length=CONTEXT)
    assert len(vocab) == simple.vocab_size == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == simple.sot_token_id and vocab["<|endoftext|>"] == simple.eot_token_id
    hf_tokenizer = clip_tokenizer_from_open_clip(context_length=CONTEXT)
    save_vocab_files(tmp_path)  # the same tokenizer from the slow-tokenizer files alone
    from_files = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=CONTEXT)
    texts = TEXTS + ["Hello World", "  leading and   trailing spaces ", "numbers 1234 and 3.14", "naïve café",
                     "emoji 🐈 cat", "UPPER lower MiXeD", "don't we'll they've", "a-b_c/d"]
    expected = simple(texts)
    got = hf_tokenizer(texts, truncation=True, max_length=CONTEXT)["input_ids"]
    for text, row, ids in zip(texts, expected, got):
        length = int((row != 0).sum())  # open_clip pads with 0 ("!"), CLIPTokenizer with <|endoftext|>
        assert ids == row[:length].tolist(), text
    assert from_files(texts, truncation=True)["input_ids"] == got
    long = got[TEXTS.index(" ".join(["cat"] * 40))]
    assert long[-1] == simple.eot_token_id and len(long) == CONTEXT  # truncation keeps <|endoftext|> last
    # documented difference: open_clip unescapes HTML entities (and ftfy-fixes mojibake), CLIPTokenizer does not
    assert simple.encode("fish &amp; chips") != hf_tokenizer("fish &amp; chips", add_special_tokens=False)["input_ids"]


def test_image_processor_matches_open_clip_preprocess():
    preprocess = open_clip.image_transform(32, is_train=False)
    processor = clip_image_processor({"size": 32})
    rng = np.random.default_rng(0)
    for width, height in [(32, 32), (48, 40), (100, 72)]:  # even crop margins (see the module docstring)
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(pixels, preprocess(image), atol=0.05, rtol=0)  # torchvision vs PIL antialias


def test_open_clip_folder_round_trip_and_pipeline(tmp_path):
    oc_model = tiny_open_clip()
    save_open_clip(oc_model, tiny_model_cfg(), tmp_path / "oc")
    config = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["size"] == 32 and config["model_cfg"] == tiny_model_cfg()

    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    for key, value in oc_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    convert_open_clip_folder(tmp_path / "oc", tmp_path / "hf")
    hf_model = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert_same_outputs(oc_model, hf_model)
    pil = AutoImageProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    rng = np.random.default_rng(5)
    big = Image.fromarray(rng.integers(0, 256, (72, 100, 3), dtype=np.uint8))
    torch.testing.assert_close(pil(images=big, return_tensors="pt")["pixel_values"][0], preprocess(big),
                               atol=1e-6, rtol=0)  # the PIL backend is open_clip's preprocess exactly

    labels = ["cat", "dog", "diagram"]
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path / "hf"), device="cpu")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    with torch.no_grad():
        text_features = oc_model.encode_text(tokenizer([f"This is a photo of {c}." for c in labels]), normalize=True)
        for seed in (0, 1):
            image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))
            image_features = oc_model.encode_image(preprocess(image)[None], normalize=True)
            probs = (oc_model.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)[0]
            scores = {r["label"]: r["score"] for r in classifier(image, candidate_labels=labels)}
            for label, prob in zip(labels, probs.tolist()):
                assert scores[label] == pytest.approx(prob, abs=1e-5), label


def test_clip_model_folder_to_open_clip_local_dir(tmp_path):
    oc_model = tiny_open_clip(quick_gelu=True)
    save_open_clip(oc_model, tiny_model_cfg(quick_gelu=True), tmp_path / "oc")
    convert_open_clip_folder(tmp_path / "oc", tmp_path / "hf")
    convert_clip_model_folder(tmp_path / "hf", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"] == {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                        "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                                        "size": 32, "resize_mode": "shortest"}
    loaded = open_clip.create_model(f"local-dir:{tmp_path / 'back'}").eval()
    for key, value in oc_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert open_clip.get_tokenizer(f"local-dir:{tmp_path / 'back'}").context_length == CONTEXT


def _replace_text_tower(model):
    model.text = nn.Identity()  # stands in for an HFTextEncoder (building one needs the Hub)
    return model


REFUSED = [
    ({"vision": {"attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4}},
     "vision_cfg.attentional_pool"),
    ({"vision": {"layers": [1, 1, 1, 1], "width": 16, "head_width": 8}}, "vision_cfg.layers"),
    ({"vision": {"pool_type": "avg"}}, "vision_cfg.pool_type"),
    ({"vision": {"no_ln_pre": True}}, "vision_cfg.no_ln_pre"),
    ({"vision": {"qk_norm": True}}, "vision_cfg.block_type"),
    ({"text": {"no_causal_mask": True}}, "text_cfg.no_causal_mask"),
    ({"text": {"pool_type": "last"}}, "text_cfg.pool_type"),
    ({"text": {"pool_type": "eos", "eos_id": 2}}, "text_cfg.pool_type"),
    ({"text": {"proj_bias": True}}, "text_cfg.proj_bias"),
    ({"text": {"embed_cls": True}, "cls": open_clip.CustomTextCLIP}, "text_cfg.embed_cls"),
    ({"text": {"scale_fc": True}}, "text_cfg.block_type"),
    ({"init_logit_bias": -10.0}, "logit_bias"),
]


@pytest.mark.parametrize(("kwargs", "field"), REFUSED, ids=[field for _, field in REFUSED])
def test_refused_open_clip_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        open_clip_to_transformers(tiny_open_clip(**kwargs))


def test_refused_towers_and_models_name_what():
    with pytest.raises(ValueError, match=r"text_cfg\.hf_model_name"):
        clip_config_from_open_clip(_replace_text_tower(tiny_open_clip(cls=open_clip.CustomTextCLIP)))
    with pytest.raises(ValueError, match="model: expected open_clip.CLIP"):
        open_clip_to_transformers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model: expected transformers.CLIPModel"):
        transformers_to_open_clip(tiny_open_clip())
    config = CLIPConfig(text_config={"hidden_act": "gelu", "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2},
                        vision_config={"hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64,
                                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
                                       "patch_size": 8})
    with pytest.raises(ValueError, match="hidden_act"):
        transformers_to_open_clip(CLIPModel(config))
    with pytest.raises(ValueError, match=r"preprocess_cfg\.resize_mode"):
        clip_image_processor({"size": 32, "resize_mode": "longest"})
