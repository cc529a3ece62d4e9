"""``hfx space``: the Gradio app written for each artifact kind, used as a person would.

Every kind gets a tiny artifact built here, its Space written by ``hfx space``, and ``python app.py`` started on
127.0.0.1 as a Space would run it (all apps start together, in one module fixture). Every endpoint is driven
through ``gradio_client`` and compared with the artifact called directly (same seed, same image); the page is
loaded in headless Chromium (Debian's ``chromium``, driven by Playwright), screenshotted, and its components
checked. ``--push`` goes to the loopback Hub as a Gradio Space; a Space for a repo id loads the repo from it.
The browser tests carry the ``browser`` marker; ``make test`` installs chromium and runs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import hub_environment, hub_fixture  # noqa: F401  (the `hub` fixture)
from PIL import Image

import hfx  # noqa: F401  (registers hfx's classes)
from hfx.cli import main
from hfx.space import SPACE_KINDS, build_space, detect_kind
from hfx.space.runtime import guidance_curve, to_images, to_pixels

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CLASSES = ["zero", "one", "two"]
START_SECONDS = 240  # all apps start at once on a 2-core machine


# ---------------------------------------------------------------------------------------------- artifacts
def tiny_class_conditional(folder: Path) -> Path:
    """A 3-class 8x8 ClassConditionalPipeline with a card that carries `hfx demo`'s guidance table."""
    from diffusers import DDPMScheduler, UNet2DModel

    from hfx.demo import DemoResult, SampleScore, results_table
    from hfx.pipelines import ClassConditionalPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, num_class_embeds=len(CLASSES) + 1)
    ClassConditionalPipeline(unet, DDPMScheduler(num_train_timesteps=50), class_names=CLASSES).save_pretrained(folder)
    scores = [SampleScore(g, variant, 30, accuracy, fid, 0.001, 0.0001, 1.0) for g, variant, accuracy, fid in
              [(0.0, "cfg", 0.31, 40.0), (1.0, "cfg", 0.8, 20.0), (3.0, "cfg", 0.95, 25.0), (3.0, "rescale 0.7", 0.93, 22.0)]]
    result = DemoResult(str(folder), 0.97, 1.0, 5.0, 0.001, 30, 360, {}, scores)
    (folder / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# tiny\n\n## Measured by `hfx demo`\n\n"
                                      f"{results_table(result)}\n")
    return folder


def tiny_gan(folder: Path) -> Path:
    """A conditional StyleGAN generator (truncation works) in a GANPipeline."""
    from hfx.models.gan import StyleGANGenerator
    from hfx.pipelines import GANPipeline

    torch.manual_seed(0)
    generator = StyleGANGenerator(image_size=8, latent_dim=8, w_dim=8, base_channels=4, max_channels=8,
                                  mapping_layers=2, num_classes=len(CLASSES), style_mode="adain")
    GANPipeline(generator, class_names=CLASSES).save_pretrained(folder)
    return folder


def tiny_cyclegan(folder: Path) -> Path:
    from hfx.models.gan import CycleGANGenerator
    from hfx.pipelines import CycleGANPipeline

    torch.manual_seed(0)
    g = dict(in_channels=1, out_channels=1, sample_size=16, base_channels=4, num_blocks=1)
    CycleGANPipeline(CycleGANGenerator(**g).eval(), CycleGANGenerator(**g).eval(),
                     domain_names=["thin", "thick"]).save_pretrained(folder)
    return folder


def tiny_vae(folder: Path) -> Path:
    from hfx.models.vae import HfxVAEConfig, HfxVAEModel

    torch.manual_seed(0)
    HfxVAEModel(HfxVAEConfig(image_size=8, block_out_channels=[8, 16], latent_channels=2,
                             norm_num_groups=4)).save_pretrained(folder)
    return folder


def tiny_image_classifier(folder: Path) -> Path:
    """A timm model saved as the image-classification task saves one (timm's layout + hfx_preprocessing.json)."""
    import timm
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    torch.manual_seed(0)
    folder.mkdir(parents=True)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=len(CLASSES)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    save_config_for_hf(model, str(folder / "config.json"), model_args={"in_chans": 1, "num_classes": len(CLASSES)},
                       model_config={"label_names": CLASSES})
    (folder / "hfx_preprocessing.json").write_text(json.dumps(
        {"image_size": 16, "mode": "L", "mean": 0.5, "std": 0.5, "scale": "pixel / 255", "labels": CLASSES}))
    return folder


def _tokenizer():
    from transformers import AutoTokenizer

    from hfx.models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def tiny_text_classifier(folder: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, id2label=dict(enumerate(CLASSES)))
    BertForSequenceClassification(config).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def tiny_text_classifier_adapter(folder: Path) -> Path:
    """A LoRA adapter (SEQ_CLS) on a tiny BERT saved beside it, with the labels in its card's load snippet, as
    the text-classification task writes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = folder.parent / "adapter-base"
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=48, max_position_embeddings=64,
                                             num_labels=len(CLASSES))).save_pretrained(base)
    model = get_peft_model(BertForSequenceClassification.from_pretrained(base),
                           LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], init_lora_weights=False))
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text(f"```python\nid2label = {dict(enumerate(CLASSES))!r}\n```\n")
    return folder


def tiny_causal_lm(folder: Path) -> Path:
    from hfx.models.lm import HfxLMConfig, HfxLMForCausalLM

    torch.manual_seed(0)
    model = HfxLMForCausalLM(HfxLMConfig(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    with torch.no_grad():  # away from near-uniform outputs, so greedy choices are not ties
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


ARTIFACTS = {"class-conditional": tiny_class_conditional, "gan": tiny_gan, "cyclegan": tiny_cyclegan, "vae": tiny_vae,
             "image-classifier": tiny_image_classifier, "text-classifier": tiny_text_classifier,
             "causal-lm": tiny_causal_lm, "text-classifier-adapter": tiny_text_classifier_adapter}
KIND = {"text-classifier-adapter": "text-classifier"}  # the kind of an artifact whose name is not its kind


# ---------------------------------------------------------------------------------------------- running apps
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class App:
    """``python app.py`` of a Space folder, serving on 127.0.0.1:<port>, as a Space runs it."""

    def __init__(self, space: Path, extra_env: dict | None = None):
        self.space, self.port = space, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(self.port),
               "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", **(extra_env or {})}
        self.log = open(space.parent / f"{space.name}.log", "w+")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def wait(self, deadline: float) -> App:
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"{self.space}/app.py exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return self
            if time.monotonic() > deadline:
                pytest.fail(f"{self.space}/app.py did not answer within {START_SECONDS} s:\n{self.output()[-3000:]}")
            time.sleep(0.5)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    return {kind: make(root / kind) for kind, make in ARTIFACTS.items()}


@pytest.fixture(scope="module")
def apps(artifacts, tmp_path_factory) -> dict[str, App]:
    """Every kind's Space, written by the CLI and started together."""
    root = tmp_path_factory.mktemp("spaces")
    started = {}
    try:
        for kind, folder in artifacts.items():
            assert main(["space", str(folder), "--out", str(root / kind)]) == 0
            started[kind] = App(root / kind)
        deadline = time.monotonic() + START_SECONDS
        for app in started.values():
            app.wait(deadline)
        yield started
    finally:
        for app in started.values():
            app.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (`make test` installs Debian's chromium with apt-get, which needs "
                    "root; here it could not)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser, app: App):
    """The app's page in a fresh tab, once the Gradio frontend has built it."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(app.url, wait_until="networkidle")
    page.wait_for_selector("button:has-text('Use via API')", timeout=60_000)
    return page


def labels_and_buttons(page) -> tuple[list[str], list[str]]:
    return ([t.strip() for t in page.locator("label, [data-testid='block-info']").all_inner_texts()],
            [t.strip() for t in page.get_by_role("button").all_inner_texts()])


def tabs(page) -> list[str]:
    return [t.strip() for t in page.get_by_role("tab").all_inner_texts()]


def gallery_images(result) -> list[Image.Image]:
    """The images of a Gallery output as gradio_client returns them (files on disk)."""
    return [Image.open(item["image"]).copy() for item in result]


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# ---------------------------------------------------------------------------------------------- detection
def test_every_kind_is_detected_from_its_saved_files_and_has_an_app(artifacts, tmp_path):
    assert {KIND.get(name, name) for name in ARTIFACTS} == set(SPACE_KINDS), "every kind is tested here"
    for name, folder in artifacts.items():
        assert detect_kind(folder).kind == KIND.get(name, name)
    assert detect_kind(artifacts["text-classifier-adapter"]).is_adapter
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=99, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(tmp_path / "bare-bert")
    with pytest.raises(ValueError, match=r"holds a BertModel model: hfx space has no app for it; it makes apps for "
                                         r"causal-lm, class-conditional, cyclegan, gan, image-classifier, text-classifier, vae"):
        detect_kind(tmp_path / "bare-bert")


def test_the_guidance_curve_is_read_from_the_card_table_hfx_demo_writes(artifacts, tmp_path):
    curve = guidance_curve(artifacts["class-conditional"])
    assert [(row["guidance"], row["variant"], row["accuracy"], row["fid"]) for row in curve] == [
        (0.0, "cfg", 31.0, 40.0), (1.0, "cfg", 80.0, 20.0), (3.0, "cfg", 95.0, 25.0), (3.0, "rescale 0.7", 93.0, 22.0)]
    assert guidance_curve(tmp_path) == []


def test_written_space_has_the_spaces_front_matter_requirements_and_the_artifact(apps, artifacts):
    space = apps["class-conditional"].space
    readme = (space / "README.md").read_text()
    front = readme.split("---\n")[1]
    import gradio

    assert "sdk: gradio\n" in front and f"sdk_version: {gradio.__version__}\n" in front and "app_file: app.py\n" in front
    assert "requirements.txt" in readme and f"hfx=={hfx.__version__}" in readme
    assert (space / "requirements.txt").read_text().splitlines()[1:] == [f"hfx=={hfx.__version__}",
                                                                         f"gradio=={gradio.__version__}"]
    copied = sorted(p.relative_to(space / "model").as_posix() for p in (space / "model").rglob("*") if p.is_file())
    original = sorted(p.relative_to(artifacts["class-conditional"]).as_posix()
                      for p in artifacts["class-conditional"].rglob("*") if p.is_file())
    assert copied == original
    for app in apps.values():  # each generated app is clean Python: no unused or undefined names, sorted imports
        lint = subprocess.run([str(REPO / ".venv" / "bin" / "ruff"), "check", "--no-cache", "--isolated", "--select",
                               "E,F,W,I", "--line-length", "120", str(app.space / "app.py")],
                              capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout
        source = (app.space / "app.py").read_text()
        assert source.count("api_name=") == len(json.loads((app.space / ".hfx-space.json").read_text())["endpoints"])


# ---------------------------------------------------------------------------------------------- each kind
@pytest.mark.browser
def test_class_conditional_app_samples_what_the_pipeline_samples_and_shows_the_guidance_curve(
        apps, artifacts, browser, tmp_path):
    from hfx.pipelines import ClassConditionalPipeline, scheduler_from_name

    app = apps["class-conditional"]
    client = app.client()
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/generate"}
    images = gallery_images(client.predict("two", 2.5, 4, 7, 3, api_name="/generate"))
    pipe = ClassConditionalPipeline.from_pretrained(artifacts["class-conditional"])
    pipe.scheduler = scheduler_from_name("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe([2], guidance_scale=2.5, num_inference_steps=4, num_images_per_prompt=3,
                  generator=torch.Generator().manual_seed(7)).images
    assert len(images) == 3 and all(image.size == (8, 8) for image in images)
    assert all(same_pixels(a, b) for a, b in zip(images, direct))

    page = open_page(browser, app)
    labels, buttons = labels_and_buttons(page)
    for expected in ("class", "guidance scale (0 unconditional, 1 conditional)", "denoising steps (DDIM)", "seed",
                     "images", "samples"):
        assert expected in labels, labels
    assert "Generate" in buttons
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.querySelectorAll('.hfx-pixels img').length >= 8", timeout=60_000)
    assert page.get_by_text("conditional accuracy (%)").count() >= 1  # the guidance curve's plot
    assert page.locator("canvas, svg").count() >= 2
    page.screenshot(path=tmp_path / "class-conditional.png", full_page=True)
    assert Image.open(tmp_path / "class-conditional.png").size[0] == 1200


@pytest.mark.browser
def test_gan_app_samples_and_sweeps_truncation_like_the_pipeline(apps, artifacts, browser, tmp_path):
    from hfx.pipelines import GANPipeline

    app = apps["gan"]
    client = app.client()
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/generate", "/truncation_sweep"}
    pipe = GANPipeline.from_pretrained(artifacts["gan"])
    images = gallery_images(client.predict("one", 0.6, 3, 4, api_name="/generate"))
    direct = pipe(class_labels=[1] * 4, truncation_psi=0.6, generator=torch.Generator().manual_seed(3)).images
    assert len(images) == 4 and all(same_pixels(a, b) for a, b in zip(images, direct))
    sweep = client.predict("one", 3, api_name="/truncation_sweep")
    assert [item["caption"] for item in sweep] == ["psi 0", "psi 0.25", "psi 0.5", "psi 0.75", "psi 1"]
    for psi, image in zip((0.0, 1.0), (gallery_images(sweep)[0], gallery_images(sweep)[-1])):
        one = pipe(class_labels=[1], truncation_psi=psi, generator=torch.Generator().manual_seed(3)).images[0]
        assert same_pixels(image, one)
    assert not same_pixels(gallery_images(sweep)[0], gallery_images(sweep)[-1])

    page = open_page(browser, app)
    labels, buttons = labels_and_buttons(page)
    assert {"class", "truncation psi (1: none; lower trades diversity for fidelity)", "seed"} <= set(labels), labels
    assert {"Generate", "Sweep psi"} <= set(buttons)
    page.get_by_role("button", name="Sweep psi").click()
    page.wait_for_function("document.querySelectorAll('.hfx-pixels img').length >= 5", timeout=60_000)
    page.screenshot(path=tmp_path / "gan.png", full_page=True)


@pytest.mark.browser
def test_cyclegan_app_translates_like_the_pipeline_in_both_directions(apps, artifacts, browser, tmp_path):
    from gradio_client import handle_file

    from hfx.pipelines import CycleGANPipeline

    app = apps["cyclegan"]
    client = app.client()
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/translate"}
    pipe = CycleGANPipeline.from_pretrained(artifacts["cyclegan"])
    image = _digit_like(1)
    image.save(tmp_path / "digit.png")
    for direction, name in (("a_to_b", "thin -> thick"), ("b_to_a", "thick -> thin")):
        got = Image.open(client.predict(handle_file(str(tmp_path / "digit.png")), name, api_name="/translate"))
        assert same_pixels(got, pipe(image, direction=direction).images[0]) and got.size == (16, 16)
    image.resize((64, 64)).save(tmp_path / "large.png")  # another size is resized to the generators' side
    got = Image.open(client.predict(handle_file(str(tmp_path / "large.png")), "thin -> thick", api_name="/translate"))
    assert got.size == (16, 16)

    page = open_page(browser, app)
    labels, buttons = labels_and_buttons(page)
    assert {"image", "direction", "translated"} <= set(labels) and "Translate" in buttons, (labels, buttons)
    assert page.get_by_label("thick -> thin").count() == 1
    page.locator("input[type=file]").first.set_input_files(str(tmp_path / "digit.png"))
    page.get_by_role("button", name="Translate").click()
    page.wait_for_selector(".hfx-pixels img", timeout=60_000)
    page.screenshot(path=tmp_path / "cyclegan.png", full_page=True)


@pytest.mark.browser
def test_vae_app_interpolates_and_samples_like_the_model(apps, artifacts, browser, tmp_path):
    from transformers import AutoModel

    app = apps["vae"]
    client = app.client()
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/interpolate", "/interpolate_images", "/sample"}
    vae = AutoModel.from_pretrained(artifacts["vae"]).eval()
    path = gallery_images(client.predict("-", 4, 9, 5, api_name="/interpolate"))
    z_a, z_b = (torch.randn(vae.latent_shape, generator=torch.Generator().manual_seed(s)) for s in (4, 9))
    ends = to_images(vae.decode(torch.stack([z_a, z_b])))
    assert len(path) == 5 and same_pixels(path[0], ends[0]) and same_pixels(path[-1], ends[1])
    samples = gallery_images(client.predict("-", 2, 3, api_name="/sample"))
    direct = to_images(vae.sample(3, generator=torch.Generator().manual_seed(2)))
    assert all(same_pixels(a, b) for a, b in zip(samples, direct)) and samples[0].size == (8, 8)
    a, b = (to_images(vae.sample(1, generator=torch.Generator().manual_seed(s)))[0] for s in (11, 12))
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    from gradio_client import handle_file

    between = gallery_images(client.predict("-", handle_file(str(tmp_path / "a.png")), handle_file(str(tmp_path / "b.png")),
                                            4, api_name="/interpolate_images"))
    expected = to_images(vae.interpolate(to_pixels(a, 8, "L"), to_pixels(b, 8, "L"), steps=4))
    assert len(between) == 4 and all(same_pixels(x, y) for x, y in zip(between, expected))

    page = open_page(browser, app)
    labels, buttons = labels_and_buttons(page)
    assert {"seed A", "seed B", "steps"} <= set(labels), labels
    assert "Interpolate" in buttons, buttons
    assert tabs(page) == ["Interpolate", "Interpolate two images", "Sample"]
    page.get_by_role("button", name="Interpolate", exact=True).click()
    page.wait_for_function("document.querySelectorAll('.hfx-pixels img').length >= 8", timeout=60_000)
    page.screenshot(path=tmp_path / "vae.png", full_page=True)


def _digit_like(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8), mode="L")


@pytest.mark.browser
def test_image_classifier_app_gives_the_classifiers_own_probabilities_for_uploads_and_drawings(
        apps, artifacts, browser, tmp_path):
    from gradio_client import handle_file

    from hfx.metrics.classifier import TrainedImageClassifier

    app = apps["image-classifier"]
    client = app.client()
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/classify", "/classify_drawing"}
    classifier = TrainedImageClassifier(artifacts["image-classifier"])
    image = _digit_like()
    image.save(tmp_path / "digit.png")
    label, cam = client.predict(handle_file(str(tmp_path / "digit.png")), api_name="/classify")
    top = label["label"]
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    expected = classifier.features_and_logits(to_pixels(image, 16, "L"))[1].softmax(-1)[0]
    assert set(got) == set(CLASSES) and sum(got.values()) == pytest.approx(1.0, abs=1e-5)
    assert [got[name] for name in CLASSES] == pytest.approx(expected.tolist(), abs=1e-6)
    assert label["label"] == CLASSES[int(expected.argmax())]
    if _has_interpret():  # the Grad-CAM of the top class over the image the model saw, at 224 x 224
        from hfx.interpret import explain, overlay

        heatmap = explain(classifier.model, classifier.normalise(to_pixels(image, 16, "L")), method="gradcam",
                          target=int(expected.argmax())).heatmaps[0]
        shown = overlay(image.convert("RGB").resize((224, 224), Image.NEAREST), heatmap)
        assert same_pixels(Image.open(cam), shown) and shown.size == (224, 224)
    else:
        assert cam is None

    # A drawing: black strokes on a transparent canvas, as the Sketchpad sends it; classified as white on black.
    canvas = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    for x in range(100, 180):
        for y in range(60, 220):
            if abs(x - 140) < 12:
                canvas.putpixel((x, y), (0, 0, 0, 255))
    canvas.save(tmp_path / "drawing.png")
    drawing = {"background": None, "layers": [handle_file(str(tmp_path / "drawing.png"))],
               "composite": handle_file(str(tmp_path / "drawing.png"))}
    label, _ = client.predict(drawing, api_name="/classify_drawing")
    strokes = Image.fromarray(255 - np.asarray(Image.alpha_composite(Image.new("RGBA", (280, 280), "white"), canvas)
                                                 .convert("L")))
    expected = classifier.features_and_logits(to_pixels(strokes, 16, "L"))[1].softmax(-1)[0]
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert [got[name] for name in CLASSES] == pytest.approx(expected.tolist(), abs=1e-5)

    page = open_page(browser, app)
    labels, buttons = labels_and_buttons(page)
    assert "Classify" in buttons and tabs(page) == ["Upload", "Draw"], buttons
    assert "top-3 probabilities" in labels, labels
    page.locator("input[type=file]").first.set_input_files(str(tmp_path / "digit.png"))
    page.get_by_role("button", name="Classify", exact=True).click()
    page.wait_for_selector("[data-testid='label-output-value']", timeout=60_000)
    assert top in page.locator("[data-testid='label-output-value']").first.inner_text()
    page.screenshot(path=tmp_path / "classifier.png", full_page=True)


def _has_interpret() -> bool:
    try:
        from hfx.interpret import explain, overlay  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.browser
def test_text_classifier_app_gives_the_models_probabilities(apps, artifacts, browser, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    app = apps["text-classifier"]
    client = app.client()
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/classify"}
    text = "Return the running event loop in the current OS thread."
    label = client.predict(text, api_name="/classify")
    model = AutoModelForSequenceClassification.from_pretrained(artifacts["text-classifier"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(artifacts["text-classifier"])
    with torch.no_grad():
        expected = model(**tokenizer([text], truncation=True, return_tensors="pt")).logits.softmax(-1)[0]
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert [got[name] for name in CLASSES] == pytest.approx(expected.tolist(), abs=1e-6)

    page = open_page(browser, app)
    page.get_by_label("text").fill(text)
    page.get_by_role("button", name="Classify").click()
    page.wait_for_selector("[data-testid='label-output-value']", timeout=60_000)
    page.screenshot(path=tmp_path / "text.png", full_page=True)


def test_text_classifier_adapter_app_gives_the_adapted_models_probabilities_with_the_cards_labels(apps, artifacts):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = artifacts["text-classifier-adapter"]
    text = "Log a message with severity ERROR on the root logger."
    label = apps["text-classifier-adapter"].client().predict(text, api_name="/classify")
    base = AutoModelForSequenceClassification.from_pretrained(folder.parent / "adapter-base")
    model = PeftModel.from_pretrained(base, folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        expected = model(**tokenizer([text], truncation=True, return_tensors="pt")).logits.softmax(-1)[0]
    got = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(got) == set(CLASSES) and [got[name] for name in CLASSES] == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.browser
def test_causal_lm_app_completes_like_generate(apps, artifacts, browser, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    app = apps["causal-lm"]
    client = app.client()
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/complete"}
    completion = client.predict("def read", 6, 0, 0, api_name="/complete")
    model = AutoModelForCausalLM.from_pretrained(artifacts["causal-lm"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(artifacts["causal-lm"])
    batch = tokenizer("def read", return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert completion == "def read" + tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    sampled = [client.predict("def read", 6, 1.0, seed, api_name="/complete") for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0].startswith("def read")

    page = open_page(browser, app)
    labels, buttons = labels_and_buttons(page)
    assert {"prompt", "new tokens", "temperature (0: greedy)", "seed", "completion"} <= set(labels), labels
    page.get_by_role("button", name="Complete").click()
    page.wait_for_function("document.querySelectorAll('textarea')[1].value.length > 4", timeout=60_000)
    page.screenshot(path=tmp_path / "lm.png", full_page=True)


# ---------------------------------------------------------------------------------------------- CLI and Hub
def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["space", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_errors_are_one_line_and_never_delete_files_hfx_did_not_write(artifacts, tmp_path, capsys):
    source = str(artifacts["gan"])
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-an-artifact").mkdir()
    (tmp_path / "not-an-artifact" / "notes.txt").write_text("mine")
    cases = [
        ([str(tmp_path / "not-an-artifact")], "is neither a run folder (with final/) nor a saved artifact"),
        ([str(tmp_path / "a-file")], "a-file is a file: give a run folder, a saved artifact folder or a Hub repo id"),
        ([str(tmp_path / "missing" / "folder")], "does not exist"),
        ([source, "--out", str(tmp_path / "not-an-artifact")], "holds files hfx space did not write (or that were edited "
                                                                "since): notes.txt"),
        ([source, "--out", str(tmp_path / "a-file")], "is a file: give a folder for the Space"),
        ([source, "--push"], "--push needs --repo-id user/name"),
        ([source, "--repo-id", "me/space"], "--repo-id names the Space to push to: add --push"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("hfx space: error: "), (argv, err)
        assert message in err and "Traceback" not in err, (argv, err)
    assert (tmp_path / "not-an-artifact" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "a-file").read_text() == "x"

    # Its own folder is rewritten; an edited app.py (or any added file) is refused and kept.
    out_dir = tmp_path / "space"
    assert run_cli(capsys, source, "--out", str(out_dir))[0] == 0
    assert run_cli(capsys, source, "--out", str(out_dir))[0] == 0
    (out_dir / "app.py").write_text((out_dir / "app.py").read_text() + "# my change\n")
    code, _, err = run_cli(capsys, source, "--out", str(out_dir))
    assert code == 1 and "app.py" in err and (out_dir / "app.py").read_text().endswith("# my change\n")


def test_default_out_folders(artifacts, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(artifacts["vae"], run / "final")
    (run / "config.yaml").write_text("task: vae\n")
    assert build_space(run) == run / "space" and (run / "space" / "model" / "config.json").is_file()
    bare = tmp_path / "vae"
    shutil.copytree(artifacts["vae"], bare)
    assert build_space(bare) == tmp_path / "vae-space"


def test_push_uploads_the_space_as_a_gradio_space_and_a_repo_id_space_loads_the_repo(hub, artifacts, tmp_path, capsys):
    from hfx.hub import push

    # --push: the folder becomes a Gradio Space, in one commit, through hfx push's publishing code.
    space_id = hub.new_repo_id("space")
    code, out, err = run_cli(capsys, str(artifacts["gan"]), "--out", str(tmp_path / "gan-space"), "--push",
                             "--repo-id", space_id)
    assert code == 0, err
    files = hub.files(f"spaces/{space_id}")
    assert {"app.py", "requirements.txt", "README.md", "model/model_index.json", "model/generator/config.json"} <= set(files)
    assert ".hfx-space.json" not in files
    assert b"sdk: gradio" in files["README.md"] and hub.repos[f"spaces/{space_id}"].sdk == "gradio"
    assert files["app.py"] == (tmp_path / "gan-space" / "app.py").read_bytes()
    assert out.strip().splitlines()[-1].startswith(f"{hub.url}/spaces/{space_id}/commit/")
    assert hub.commit_count(f"spaces/{space_id}") == 2  # the initial commit and ours

    # A Space for a repo id: the app downloads the repo at start (from this loopback Hub) and serves it.
    model_id = hub.new_repo_id("pipeline")
    push(artifacts["class-conditional"], model_id)
    code, _, err = run_cli(capsys, model_id, "--out", str(tmp_path / "repo-space"))
    assert code == 0, err
    assert not (tmp_path / "repo-space" / "model").exists()
    assert f"MODEL = artifact_folder({model_id!r}, __file__)" in (tmp_path / "repo-space" / "app.py").read_text()
    assert f"models:\n- {model_id}" in (tmp_path / "repo-space" / "README.md").read_text()
    app = App(tmp_path / "repo-space", {**hub_environment(hub.url), "HF_HOME": str(tmp_path / "hf-home")})
    try:
        app.wait(time.monotonic() + START_SECONDS)
        images = gallery_images(app.client().predict("one", 1.0, 2, 0, 1, api_name="/generate"))
        assert len(images) == 1 and images[0].size == (8, 8)
    finally:
        app.stop()
