"""The evaluate modules load offline and equal the direct classes and functions; `hfx evaluate` reports
every score with N and the extractor, from images or from saved reference features."""

from __future__ import annotations

import json
import os

import evaluate
import numpy as np
import pytest
import torch
from PIL import Image

import hfx.metrics as metrics
from hfx.cli import main
from hfx.metrics.modules import (
    CLIPScoreMetric,
    FrechetInceptionDistance,
    InceptionScore,
    KernelInceptionDistance,
    KNNAccuracy,
    LearnedPerceptualImagePatchSimilarity,
    LinearProbeAccuracy,
    PrecisionRecallMetric,
    ZeroShotAccuracy,
)

RNG = np.random.default_rng(0)
GENERATED = RNG.normal(size=(40, 6))
REFERENCE = RNG.normal(size=(55, 6)) + 0.3
LABELS, TRAIN_LABELS = RNG.integers(3, size=40), RNG.integers(3, size=55)



def test_every_module_loads_offline_and_equals_the_direct_class(tmp_path):
    from hfx.metrics.lpips import LPIPS

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.warns(UserWarning, match="LPIPS"):
        lpips = LPIPS("alex")  # random weights, saved so that every LPIPS below is the same network
    torch.save(lpips.trunk.layers.state_dict(), tmp_path / "alexnet_features.pth")
    torch.nn.init.uniform_(lpips.heads[0])
    lpips.save_heads(tmp_path / "heads.safetensors")
    lpips_files = dict(trunk_weights=str(tmp_path / "alexnet_features.pth"), heads=str(tmp_path / "heads.safetensors"))
    probs = RNG.dirichlet(np.ones(5), size=30)
    images_a = RNG.uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
    images_b = RNG.uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
    cases = {
        "fid": (FrechetInceptionDistance, dict(predictions=GENERATED, references=REFERENCE),
                {"fid": metrics.frechet_distance(GENERATED, REFERENCE), "n_predictions": 40, "n_references": 55}),
        "kid": (KernelInceptionDistance, dict(predictions=GENERATED, references=REFERENCE, subsets=5, subset_size=20),
                dict(zip(("kid", "kid_std"), metrics.kernel_inception_distance(GENERATED, REFERENCE, 5, 20)))),
        "inception_score": (InceptionScore, dict(predictions=probs, splits=3),
                            dict(zip(("inception_score", "inception_score_std"), metrics.inception_score(probs, 3)))),
        "precision_recall": (PrecisionRecallMetric, dict(predictions=GENERATED, references=REFERENCE),
                             metrics.precision_recall(REFERENCE, GENERATED)._asdict()),
        "lpips": (LearnedPerceptualImagePatchSimilarity,
                  dict(predictions=images_a, references=images_b, **lpips_files),
                  {"lpips": float(LPIPS("alex", **lpips_files)(torch.from_numpy(images_a),
                                                               torch.from_numpy(images_b)).double().mean())}),
        "clip_score": (CLIPScoreMetric, dict(predictions=GENERATED[:4], references=REFERENCE[:4]),
                       {"clip_score": float(metrics.clip_score.clip_score_from_embeddings(GENERATED[:4],
                                                                                         REFERENCE[:4]).mean())}),
        "knn_accuracy": (KNNAccuracy, dict(predictions=GENERATED[:20], references=LABELS[:20], k=5,
                                           train_features=REFERENCE, train_labels=TRAIN_LABELS),
                         {"knn_accuracy": metrics.knn_accuracy(REFERENCE, TRAIN_LABELS, GENERATED[:20], LABELS[:20], 5)}),
        "linear_probe": (LinearProbeAccuracy, dict(predictions=GENERATED[:20], references=LABELS[:20],
                                                   train_features=REFERENCE, train_labels=TRAIN_LABELS),
                         {"linear_probe_accuracy": metrics.linear_probe_accuracy(REFERENCE, TRAIN_LABELS,
                                                                                 GENERATED[:20], LABELS[:20])}),
        "zero_shot_accuracy": (ZeroShotAccuracy, dict(predictions=GENERATED[:20], references=LABELS[:20],
                                                      class_text_features=REFERENCE[:9].reshape(3, 3, 6)),
                               {"zero_shot_accuracy": metrics.zero_shot_accuracy(GENERATED[:20], LABELS[:20],
                                                                                 REFERENCE[:9].reshape(3, 3, 6)),
                                "n_prompts": 3}),
    }
    assert set(cases) == set(metrics.EVALUATE_MODULES)
    for name, (cls, inputs, expected) in cases.items():
        loaded = evaluate.load(metrics.module_path(name)).compute(**inputs)
        direct = cls().compute(**inputs)
        assert type(evaluate.load(metrics.module_path(name))) is cls
        assert loaded == direct, name
        if name == "clip_score":
            assert loaded["n_pairs"] == 4
        for key, value in expected.items():
            assert loaded[key] == pytest.approx(value, rel=1e-12), (name, key)
    with pytest.raises(ValueError, match="unknown metric module 'is'"):
        metrics.module_path("is")


def test_fid_module_streams_unequal_batches_and_takes_saved_statistics(tmp_path):
    fid = FrechetInceptionDistance()
    for start in range(0, 55, 20):  # the generated side runs out before the reference side
        fid.add_batch(predictions=GENERATED[start:start + 20] if start < 40 else None,
                      references=REFERENCE[start:start + 20])
    streamed = fid.compute(extractor={"extractor": "test-net"})
    expected = metrics.frechet_distance(GENERATED, REFERENCE)
    assert streamed == {"fid": pytest.approx(expected, rel=1e-12), "n_predictions": 40, "n_references": 55,
                        "extractor": "test-net"}
    path = metrics.FeatureStatistics.from_features(REFERENCE).save(tmp_path / "reference.npz")
    assert fid.compute(predictions=GENERATED, reference_statistics=str(path))["fid"] == pytest.approx(expected, rel=1e-12)
    only_statistics = fid.compute(prediction_statistics=metrics.FeatureStatistics.from_features(GENERATED),
                                  reference_statistics=str(path))
    assert only_statistics["fid"] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="FID needs references features or reference_statistics"):
        fid.compute(predictions=GENERATED)


def test_inception_score_module_accepts_logits():
    logits = RNG.normal(size=(20, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = InceptionScore().compute(predictions=logits, splits=2, from_logits=True)
    assert got["inception_score"] == pytest.approx(metrics.inception_score(probs, 2).mean, rel=1e-12)


# ------------------------------------------------------------------------------------------ hfx evaluate
@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A small transformers image classifier on 16x16 grey digits, saved like any fine-tuned model."""
    import transformers

    folder = tmp_path_factory.mktemp("clf")
    config = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=10, image_size=16)
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(config).save_pretrained(folder)
    return folder


def test_hfx_evaluate_reports_scores_with_n_and_extractor_and_reuses_saved_reference(tmp_path, tiny_classifier,
                                                                                     capsys):
    from hfx.data import builtin_dataset
    from hfx.metrics.extractors import load_extractor
    from hfx.metrics.scoring import extract_features

    generated = tmp_path / "generated"
    (generated / "nested").mkdir(parents=True)
    train_images = list(builtin_dataset("digits", image_size=16)["train"]["image"])[:48]
    for i, image in enumerate(train_images):
        image.save(generated / ("nested" if i % 2 else "") / f"{i:03d}.png")
    common = ["evaluate", "--generated", str(generated), "--extractor", f"hf:{tiny_classifier}",
              "--kid-subsets", "10", "--kid-subset-size", "30", "--is-splits", "4", "--json"]
    assert main(common + ["--reference", "digits:test", "--save-reference", str(tmp_path / "ref.npz")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_generated"] == 48 and report["n_reference"] == 360 and report["reference"] == "digits:test"
    assert report["extractor"] == f"ResNetForImageClassification:{tiny_classifier.name}" and report["weights"].startswith("sha256:")
    assert report["resize"] == "bilinear-antialias to 16x16"
    for key in ("fid", "kid", "kid_std", "precision", "recall", "inception_score", "inception_score_std"):
        assert np.isfinite(report[key]), key

    # The same number as the library route: extract both sides, then FID of the features.
    extractor = load_extractor(f"hf:{tiny_classifier}")
    test_images = list(builtin_dataset("digits", image_size=16)["test"]["image"])
    expected_fid = metrics.frechet_distance(extract_features(extractor, train_images).features,
                                            extract_features(extractor, test_images).features)
    assert report["fid"] == pytest.approx(expected_fid, rel=1e-9)

    assert main(common + ["--reference", str(tmp_path / "ref.npz")]) == 0  # no second pass over the dataset
    again = json.loads(capsys.readouterr().out)
    assert {k: again[k] for k in report if k != "reference"} == {k: report[k] for k in report if k != "reference"}

    # A pytorch-fid style file (mu/sigma only) still gives FID, and says what it cannot give.
    stats = metrics.FeatureStatistics.load(tmp_path / "ref.npz")
    np.savez(tmp_path / "mu_sigma.npz", mu=stats.mean.numpy(), sigma=stats.covariance.numpy())
    assert main(common[:-1] + ["--reference", str(tmp_path / "mu_sigma.npz")]) == 0
    text = capsys.readouterr().out
    assert "fid:" in text and "kid, precision, recall: the reference .npz holds statistics only" in text


def test_hfx_evaluate_names_bad_input(tmp_path, tiny_classifier, capsys):
    assert main(["evaluate", "--generated", str(tmp_path / "nope"), "--reference", "digits",
                 "--extractor", f"hf:{tiny_classifier}"]) == 1
    assert "--generated folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--generated", str(tmp_path / "empty"), "--reference", "digits",
                 "--extractor", f"hf:{tiny_classifier}"]) == 1
    assert "holds no images" in capsys.readouterr().err


def test_hfx_evaluate_samples_from_a_pipeline(tmp_path, tiny_classifier, capsys):
    from diffusers import DDIMScheduler, UNet2DModel

    from hfx.metrics.extractors import load_extractor
    from hfx.metrics.scoring import extract_features
    from hfx.pipelines import ClassConditionalPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=3)
    ClassConditionalPipeline(unet, DDIMScheduler(num_train_timesteps=50)).save_pretrained(tmp_path / "pipe")
    reference_images = [np.full((16, 16), v, np.uint8) for v in np.linspace(0, 255, 30).astype(np.uint8)]
    reference = tmp_path / "reference"
    reference.mkdir()
    for i, array in enumerate(reference_images):
        Image.fromarray(array).save(reference / f"{i}.png")
    assert main(["evaluate", "--pipeline", str(tmp_path / "pipe"), "--num-images", "10", "--steps", "2",
                 "--scheduler", "saved", "--batch-size", "4", "--seed", "3", "--reference", str(reference),
                 "--extractor", f"hf:{tiny_classifier}", "--is-splits", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_generated"] == 10 and report["n_reference"] == 30 and report["kid_subset_size"] == 10

    # The same samples drawn directly, batch by batch with one generator, give the same FID.
    pipe = ClassConditionalPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(3)
    samples = [image for labels in ([0, 1, 0, 1], [0, 1, 0, 1], [0, 1])
               for image in pipe(labels, num_inference_steps=2, generator=generator, output_type="pt").images]
    extractor = load_extractor(f"hf:{tiny_classifier}")
    expected = metrics.frechet_distance(extract_features(extractor, samples, batch_size=4).features,
                                        extract_features(extractor, reference_images, batch_size=4).features)
    assert report["fid"] == pytest.approx(expected, rel=1e-9)
