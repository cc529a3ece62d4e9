"""CycleGAN: the ResNet generator and PatchGAN discriminator, the image pool, the two-domain digits data, the
``cyclegan`` task (training, evaluation, SIGKILL/resume with its pools) and ``CycleGANPipeline``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline
from hub_server import VALID_TOKEN, hub_fixture  # noqa: F401  (the `hub` fixture)
from huggingface_hub import HfApi, hf_hub_download
from kill_resume import NO_HFX, assert_same_weights, full_killed_resumed

import hfx  # noqa: F401  (registers the pipeline)
from hfx.models.gan import CycleGANGenerator, PatchGANDiscriminator
from hfx.pipelines import CycleGANPipeline
from hfx.trainers import ConfigError, load_config, train
from hfx.trainers.tasks.cyclegan import ImagePool

TINY = {
    "task": "cyclegan", "seed": 0,
    "data": {"dataset": "digits-strokes", "options": {"image_size": 16}, "max_eval_samples": 48},
    "task_options": {"domains": ["thin", "thick"], "generator": {"base_channels": 4, "num_blocks": 1},
                     "discriminator": {"base_channels": 4, "num_layers": 2}, "pool_size": 5, "grid_size": 2,
                     "domain_measure": "stroke_width"},
    "train": {"max_steps": 6, "batch_size": 8, "max_grad_norm": None},
    "optimizer": {"name": "adam", "lr": 2e-3, "betas": [0.5, 0.999]},
    "eval": {"every_steps": None},
    "log": {"every_steps": 1, "report_to": []},
}


def recipe(out: Path, options: dict | None = None, **sections) -> dict:
    config = {**TINY, **sections, "output_dir": str(out)}
    config["task_options"] = {**TINY["task_options"], **(options or {})}
    return config


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_pipeline(size: int = 16, channels: int = 1) -> CycleGANPipeline:
    torch.manual_seed(0)
    g = dict(in_channels=channels, out_channels=channels, sample_size=size, base_channels=4, num_blocks=1)
    d = dict(in_channels=channels, sample_size=size, base_channels=4, num_layers=2)
    return CycleGANPipeline(CycleGANGenerator(**g).eval(), CycleGANGenerator(**g).eval(),
                            PatchGANDiscriminator(**d).eval(), PatchGANDiscriminator(**d).eval(),
                            domain_names=["thin", "thick"])


# ---------------------------------------------------------------------------------------------- models
def test_the_generator_keeps_the_shape_and_the_discriminator_scores_patches():
    g = CycleGANGenerator(in_channels=3, out_channels=3, sample_size=32, base_channels=8, num_blocks=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = g(x).sample
    assert y.shape == x.shape and y.abs().max() <= 1
    for layers, side in ((3, 2), (2, 6), (1, 14)):
        d = PatchGANDiscriminator(in_channels=3, sample_size=32, base_channels=8, num_layers=layers)
        assert d(x).scores.shape == (2, 1, side, side) == (2, 1, *(2 * (d.score_side(32, layers),)))
    # the reference's 70x70 PatchGAN on 256x256 images: a 30x30 map
    assert PatchGANDiscriminator.score_side(256, 3) == 30


def test_one_output_pixel_sees_a_patch_not_the_whole_image():
    """PatchGAN's point: each score depends on a bounded window of the input (34x34 for num_layers=2)."""
    d = PatchGANDiscriminator(in_channels=1, base_channels=4, num_layers=2, norm="none")
    x = torch.randn(1, 1, 64, 64, requires_grad=True)
    d(x).scores[0, 0, 0, 0].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert rows.max() - rows.min() + 1 <= 34 and cols.max() - cols.min() + 1 <= 34


@pytest.mark.parametrize("build, message", [
    (lambda: CycleGANGenerator(norm="group"), "norm must be one of 'instance', 'batch', 'none', got 'group'"),
    (lambda: CycleGANGenerator(sample_size=30), "sample_size must be a multiple of 2 ** num_downsamples = 4, got 30"),
    (lambda: CycleGANGenerator(num_blocks=-1), "num_blocks must be an integer >= 0, got -1"),
    (lambda: CycleGANGenerator(dropout=1.0), "dropout must be a number in [0, 1), got 1.0"),
    (lambda: PatchGANDiscriminator(sample_size=8, num_layers=3), "sample_size 8 is too small for num_layers=3"),
    (lambda: CycleGANGenerator(in_channels=1, sample_size=16)(torch.zeros(1, 3, 16, 16)),
     "images have 3 channels; this model takes 1"),
    (lambda: CycleGANGenerator(in_channels=1, sample_size=16)(torch.zeros(1, 1, 32, 32)),
     "images are 32x32; this model was trained on 16x16 images"),
    (lambda: PatchGANDiscriminator(in_channels=1)(torch.zeros(1, 1, 16)), "images must be a float tensor"),
])
def test_bad_model_arguments_and_inputs_are_one_line_errors(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


# ---------------------------------------------------------------------------------------------- the pool
def test_the_image_pool_fills_then_swaps_half_of_the_time_and_round_trips():
    pool = ImagePool(4)
    first = torch.arange(4.0).reshape(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first) and torch.equal(pool.images, first)  # filling: returned as given
    torch.manual_seed(0)
    swapped = 0
    for step in range(200):
        new = torch.full((1, 1, 1, 1), 100.0 + step)
        before = pool.images.clone()
        out = pool.query(new)
        if torch.equal(out, new):
            assert torch.equal(pool.images, before)  # kept the new one out of the pool
        else:
            swapped += 1
            assert out.item() in before.flatten().tolist() and new.item() in pool.images.flatten().tolist()
    assert 70 < swapped < 130  # p = 1/2
    copy = ImagePool(4)
    copy.load_state_dict(pool.state_dict())
    assert torch.equal(copy.images, pool.images)
    with pytest.raises(ConfigError, match="the checkpoint's image pools hold 4 images, task_options.pool_size is 3"):
        ImagePool(3).load_state_dict(pool.state_dict())
    assert torch.equal(ImagePool(0).query(first), first)


# ---------------------------------------------------------------------------------------------- the data
def test_the_two_domains_are_made_from_different_digits_and_are_measurably_different():
    from hfx.data import digits_strokes
    from hfx.metrics import stroke_width

    data = digits_strokes(image_size=32)
    sources = {split: {d: set() for d in (0, 1)} for split in data}
    for split in data:
        for source, domain in zip(data[split]["source"], data[split]["domain"]):
            sources[split][domain].add(source)
    everything = [s for split in sources.values() for ids in split.values() for s in ids]
    assert len(everything) == len(set(everything)) == 1797  # every original once: in one split, in one domain
    for split in data:
        labels, domains = np.array(data[split]["label"]), np.array(data[split]["domain"])
        for digit in range(10):  # each class split evenly between the domains
            counts = np.bincount(domains[labels == digit], minlength=2)
            assert abs(counts[0] - counts[1]) <= 1
    test = data["test"]
    pixels = torch.tensor(np.stack([np.asarray(im) for im in test["image"]]), dtype=torch.float32)[:, None] / 127.5 - 1
    width, domain = stroke_width(pixels), torch.tensor(test["domain"])
    thin, thick = width[domain == 0], width[domain == 1]
    middle = (thin.median() + thick.median()) / 2
    assert (thin < middle).double().mean() > 0.97 and (thick > middle).double().mean() > 0.99


def test_stroke_width_is_a_quarter_of_a_long_strokes_width_plus_half_a_pixel():
    from hfx.metrics import stroke_width

    images = -torch.ones(3, 1, 64, 64)
    for i, width in enumerate((4, 8, 16)):
        images[i, 0, 8:56, 32 - width // 2:32 + width // 2] = 1
    measured = stroke_width(images)
    expected = torch.tensor([4.0, 8.0, 16.0], dtype=torch.float64) / 4 + 0.5  # mean of 1, 2, ..., w/2 (twice)
    assert torch.allclose(measured, expected, rtol=0.12), measured  # a little less: the ends are nearer the background
    assert stroke_width(-torch.ones(1, 1, 8, 8)).item() == 0
    with pytest.raises(ValueError, match="pixels must be greyscale"):
        stroke_width(torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- the task
@pytest.fixture(scope="module")
def evaluator(tmp_path_factory) -> Path:
    """A (barely) trained classifier of the two-domain digits: the evaluation needs its features."""
    out = tmp_path_factory.mktemp("evaluator")
    return train("classify-digits-strokes", [f"output_dir={out}", "train.max_steps=2", "train.batch_size=16",
                                             "data.options.image_size=16", "eval.every_steps=null", "eval.at_end=false",
                                             "checkpoint.every_steps=null", "log.report_to=[]"]).final_dir


def test_training_lowers_the_cycle_loss_and_the_pipeline_reloads_in_a_fresh_process(tmp_path, evaluator, hub):
    out = tmp_path / "run"
    config = recipe(out, {"evaluator": str(evaluator)}, train={**TINY["train"], "max_steps": 40},
                    eval={"every_steps": 40, "at_start": True})
    result = train(load_config(config))
    evals = [r for r in records(out) if "eval/cycle_l1_a" in r]
    assert [r["step"] for r in evals] == [0, 40]
    for key in ("cycle_l1_a", "cycle_l1_b"):
        assert evals[-1][f"eval/{key}"] < 0.7 * evals[0][f"eval/{key}"], (key, evals)
    for key in ("class_preserved_a_to_b", "class_preserved_b_to_a", "real_accuracy_a", "in_target_a_to_b",
                "in_target_b_to_a", "real_in_own_a", "real_in_own_b"):
        assert 0 <= evals[-1][f"eval/{key}"] <= 1
    assert evals[-1]["eval/fid_a_to_b"] > 0 and evals[-1]["eval/fid_b_to_a"] > 0
    # the logged losses of both phases, and the task's count of images (A and B) each side saw
    last = records(out)[-2]
    assert {"loss/generator", "loss/discriminator", "cycle/generator", "identity/generator", "d_a/discriminator"} <= set(last)
    assert (out / "samples" / "translations-step-0000040.png").is_file()
    card = (result.final_dir / "README.md").read_text()
    assert "pipeline_tag: image-to-image" in card and "class_preserved_a_to_b" in card and "translations" in card

    pipe = CycleGANPipeline.from_pretrained(result.final_dir)
    images = hfx.data.digits_strokes(image_size=16)["test"]["image"][:4]
    expected = pipe(images, direction="a_to_b", output_type="np").images
    np.save(tmp_path / "expected.npy", expected)
    for i, image in enumerate(images):
        image.save(tmp_path / f"in{i}.png")
    script = ("import sys, numpy as np, PIL.Image\nfrom diffusers import DiffusionPipeline\nimport hfx\n"
              "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
              "images = [PIL.Image.open(f'{sys.argv[2]}/in{i}.png') for i in range(4)]\n"
              "np.save(sys.argv[2] + '/got.npy', pipe(images, direction='a_to_b', output_type='np').images)\n"
              "print(type(pipe).__name__)")
    run = subprocess.run([sys.executable, "-c", script, str(result.final_dir), str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "CycleGANPipeline"
    assert np.array_equal(np.load(tmp_path / "got.npy"), expected)

    # hfx push: the artifact and its card in one commit; loaded back by repo id, it translates the same
    from hfx.hub import push

    repo_id = hub.new_repo_id("cyclegan-run")
    push(out, repo_id)
    pulled = DiffusionPipeline.from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    assert type(pulled) is CycleGANPipeline
    assert np.array_equal(pulled(images, direction="a_to_b", output_type="np").images, expected)
    card = Path(hf_hub_download(repo_id, "README.md", cache_dir=tmp_path / "cache")).read_text()
    assert "pipeline_tag: image-to-image" in card and "class_preserved_a_to_b" in card


def test_a_sigkilled_run_resumes_bit_identically_with_its_image_pools(tmp_path):
    config = recipe(tmp_path / "run", train={**TINY["train"], "max_steps": 80, "batch_size": 4},
                    scheduler={"name": "warmup_stable_decay", "options": {"num_decay_steps": 40, "decay_type": "linear"}},
                    eval={"every_steps": 40}, checkpoint={"every_steps": 20}, log={"every_steps": 7, "report_to": []})
    full, killed, _ = full_killed_resumed(config, tmp_path, kill_at=40)
    # the pools were full (5 of 5 images each) when the run died: the resumed run continued from them
    pools = torch.load(killed / "checkpoint-40" / "task_state_0.pt", weights_only=True)["pools"]
    assert all(pool["images"].shape == (5, 1, 16, 16) for pool in pools.values())
    assert_same_weights(full, killed, ["generator_ab", "generator_ba", "discriminator_a", "discriminator_b"])
    assert [r for r in records(full) if "eval/cycle_l1_a" in r] == [r for r in records(killed) if "eval/cycle_l1_a" in r]
    final_full = torch.load(full / "checkpoint-80" / "task_state_0.pt", weights_only=True)
    final_killed = torch.load(killed / "checkpoint-80" / "task_state_0.pt", weights_only=True)
    for key in ("a", "b"):
        assert torch.equal(final_full["pools"][key]["images"], final_killed["pools"][key]["images"])
    assert final_full["images_seen"] == final_killed["images_seen"] == {"generator": 80 * 8, "discriminator": 80 * 8}
    lrs = [r["lr/generator"] for r in records(full) if "lr/generator" in r]
    assert lrs[0] == 2e-3 and lrs[-1] < 2e-4  # constant, then linearly towards 0


BAD = [
    ({"loss": "lsgam"}, "unknown task_options.loss 'lsgam' for cyclegan; did you mean 'lsgan'?"),
    ({"loss": "wgan"}, "task_options.loss 'wgan' is not for cyclegan: its critic needs a Lipschitz constraint"),
    ({"loss": "hinje"}, "unknown task_options.loss 'hinje' for cyclegan; did you mean 'hinge'?"),
    ({"cycle_weight": -1.0}, "config key 'task_options.cycle_weight' must be >= 0, got -1.0"),
    ({"pool_size": -5}, "config key 'task_options.pool_size' must be >= 0, got -5"),
    ({"generator": {"sample_size": 16}}, "task_options.generator.sample_size cannot be set: it comes from the data"),
    ({"domains": ["thin", "thin"]}, "task_options.domains must be two different domain names (A first)"),
    ({"domain_measure": "slant"}, "unknown task_options.domain_measure 'slant'; choose from stroke_width or null"),
]
BAD_AT_BUILD = [
    ({"domains": ["thin", "bold"]}, "task_options.domains names ['bold'] not in the column 'domain' (its values: thin, thick)"),
    ({"domain_column": "style"}, "dataset 'digits-strokes' has no column 'style' (columns: image, label, domain, source); "
                                 "set task_options.domain_column"),
    ({"generator": {"base_chanels": 4}}, "task_options.generator does not make a CycleGANGenerator: "),
    ({"discriminator": {"norm": "group"}}, "task_options.discriminator does not make a PatchGANDiscriminator: norm must"),
    ({"evaluator": "/nowhere"}, "task_options.evaluator '/nowhere' is not an image-classification artifact"),
]


@pytest.mark.parametrize("options, message", BAD)
def test_bad_recipes_are_one_line_config_errors_naming_the_key(options, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(recipe(tmp_path, options))
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("options, message", BAD_AT_BUILD)
def test_bad_data_and_model_options_fail_before_training_in_one_line(options, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        train(load_config(recipe(tmp_path, options)))
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "final").exists()


def test_the_shipped_recipes_load_and_validate(tmp_path):
    config = load_config("cyclegan-digits", [f"output_dir={tmp_path}"])
    opts = config.task_options
    assert (config.task, opts.loss, opts.cycle_weight, opts.identity_weight, opts.pool_size) == ("cyclegan", "lsgan", 10.0,
                                                                                                 0.5, 50)
    assert config.optimizer.lr == 2e-4 and tuple(config.optimizer.betas) == (0.5, 0.999)
    assert config.scheduler.options["num_decay_steps"] == config.train.max_steps // 2
    assert load_config("classify-digits-strokes", [f"output_dir={tmp_path}"]).data.dataset == "digits-strokes"


# ---------------------------------------------------------------------------------------------- the pipeline
def test_the_pipeline_takes_pil_arrays_and_tensors_and_gives_the_generators_output(tmp_path):
    pipe = tiny_pipeline()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        direct = (pipe.generator_ab(x * 2 - 1).sample / 2 + 0.5).clamp(0, 1)
        inverse = (pipe.generator_ba(x * 2 - 1).sample / 2 + 0.5).clamp(0, 1)
    assert torch.equal(pipe(x, output_type="pt").images, direct)
    back = pipe(x, direction="b_to_a", output_type="pt").images
    assert torch.equal(back, inverse)
    as_np = pipe(x.permute(0, 2, 3, 1).numpy(), output_type="np").images
    assert as_np.shape == (3, 16, 16, 1) and np.allclose(as_np, direct.permute(0, 2, 3, 1).numpy())
    rgb = PIL.Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8), "RGB")
    out = pipe([rgb, rgb.convert("L")], output_type="pil").images  # PIL images are converted to the model's mode
    assert [im.size for im in out] == [(16, 16)] * 2 and np.array_equal(np.asarray(out[0]), np.asarray(out[1]))
    assert isinstance(pipe(x[0], return_dict=False), tuple)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is CycleGANPipeline and loaded.domain_names == ["thin", "thick"]
    assert torch.equal(loaded(x, output_type="pt").images, direct)
    usage = CycleGANPipeline.hub_card_usage(tmp_path)
    namespace = {"PIL": PIL, "pipe": loaded}
    exec("import PIL.Image\n" + usage, namespace)  # the card's snippet runs as written
    assert namespace["translated"].size == (16, 16)


def test_the_pipeline_loads_by_repo_id(hub, tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    repo_id = hub.new_repo_id("cyclegan")
    api = HfApi(endpoint=hub.url, token=VALID_TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "pipe")
    loaded = DiffusionPipeline.from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    assert type(loaded) is CycleGANPipeline
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x, output_type="pt").images, pipe(x, output_type="pt").images)


BAD_CALLS = [
    (dict(images=torch.rand(1, 3, 16, 16)), "images[0] has 3 channels; this pipeline's generators take 1 (L images)"),
    (dict(images=torch.rand(2, 1, 32, 32)), "images[0] is 32x32; this pipeline translates 16x16 images (resize it first)"),
    (dict(images=[PIL.Image.new("L", (8, 8))]), "images[0] is 8x8; this pipeline translates 16x16 images"),
    (dict(images=torch.rand(1, 1, 16, 16) * 2 - 1), "images[0] has values outside [0, 1]"),
    (dict(images=torch.zeros(1, 1, 16, 16, dtype=torch.uint8)), "images[0] must be a float tensor (C, H, W) in [0, 1]"),
    (dict(images=[]), "images is empty: give at least one image"),
    (dict(images="a.png"), "images must be a PIL image, an array, a tensor or a list of them, got str"),
    (dict(images=torch.rand(1, 1, 16, 16), direction="thin_to_thick"),
     "direction must be 'a_to_b' (thin -> thick) or 'b_to_a' (thick -> thin), got 'thin_to_thick'"),
    (dict(images=torch.rand(1, 1, 16, 16), output_type="jpg"), "output_type must be 'pil', 'np' or 'pt', got 'jpg'"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CALLS)
def test_bad_pipeline_arguments_are_one_line_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError) as error:
        tiny_pipeline()(**kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_bad_pipeline_components_are_one_line_errors():
    g1 = CycleGANGenerator(in_channels=1, out_channels=1, sample_size=16, base_channels=4, num_blocks=1)
    g3 = CycleGANGenerator(in_channels=3, out_channels=3, sample_size=16, base_channels=4, num_blocks=1)
    d3 = PatchGANDiscriminator(in_channels=3, base_channels=4)
    for build, message in [
        (lambda: CycleGANPipeline(torch.nn.Linear(2, 2), g1), "generator_ab must be a CycleGANGenerator, got Linear"),
        (lambda: CycleGANPipeline(g1, g3), "generator_ab maps (channels, size) 1, 16 -> 1 and generator_ba 3, 16 -> 3"),
        (lambda: CycleGANPipeline(g1, g1, d3), "discriminator_a takes 3 channels, its domain's images have 1"),
        (lambda: CycleGANPipeline(g1, g1, domain_names=["x", "x"]), "domain_names must be two different non-empty"),
    ]:
        with pytest.raises(ValueError) as error:
            build()
        assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


NO_HFX_CALL = NO_HFX.format(call='pipe(torch.linspace(0, 1, 512).reshape(2, 1, 16, 16), direction="b_to_a", '
                                   'output_type="pt").images')


def test_the_remote_code_export_translates_the_same_where_hfx_cannot_be_imported(tmp_path):
    from hfx.hub.export import export_remote_code

    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    export_remote_code(tmp_path / "pipe", tmp_path / "export")
    run = subprocess.run([sys.executable, "-c", NO_HFX_CALL, str(tmp_path / "export"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    exported = torch.load(tmp_path / "out.pt", weights_only=True)
    x = torch.linspace(0, 1, 512).reshape(2, 1, 16, 16)
    assert exported["type"] == "CycleGANPipeline"
    assert torch.equal(exported["images"], pipe(x, direction="b_to_a", output_type="pt").images)
