"""The app of each artifact kind: ONE small function per kind returns the kind-specific part of ``app.py``.

A kind function takes the :class:`Artifact` and returns a :class:`SpaceApp` whose ``body`` is Python source
that runs after the common header (:func:`hfx.space.writer.render_app`): the header has imported ``gradio as
gr``, ``torch`` and ``hfx``, and set ``MODEL`` (the artifact's folder), ``DEVICE``, ``TITLE``, ``DESCRIPTION``
and ``PIXELS`` (the CSS class that shows small images unsmoothed); the body loads the model and defines
``demo``, a ``gr.Blocks`` in which every event has an ``api_name``. The kind of an artifact comes from the
files ``save_pretrained`` writes (:func:`detect_kind`); add a kind with a function and a line in
:data:`SPACE_KINDS` (and, for a new pipeline or model class, a line in the detection tables).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import pprint
import re
from collections.abc import Callable
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A saved artifact an app is written for.

    Attributes:
        folder: where its files are (a local folder, or a download of a repo's JSON files for a repo id).
        kind: a key of :data:`SPACE_KINDS`.
        config: ``model_index.json``, ``adapter_config.json`` or ``config.json``, parsed.
        is_adapter: a PEFT adapter (``adapter_config.json``); ``config`` is the adapter's.
    """

    folder: Path
    kind: str
    config: dict
    is_adapter: bool = False


@dataclasses.dataclass(frozen=True)
class SpaceApp:
    """The kind-specific part of an app: see the module docstring.

    Attributes:
        kind: the artifact kind.
        title: the app's title (also the Space's).
        summary: a sentence on what the app does, for the page and the Space's README.
        body: Python source, after the common header.
        endpoints: the ``api_name`` of every event the body defines, for the README.
        emoji: the Space's emoji (README front matter).
    """

    kind: str
    title: str
    summary: str
    body: str
    endpoints: tuple[str, ...]
    emoji: str = "🧪"


# ---------------------------------------------------------------------------------------------- detection
#: model_index.json ``_class_name`` -> kind.
PIPELINE_KINDS = {"ClassConditionalPipeline": "class-conditional", "LatentDiffusionPipeline": "class-conditional",
                  "GANPipeline": "gan", "CycleGANPipeline": "cyclegan"}
#: config.json ``model_type`` -> kind.
MODEL_TYPE_KINDS = {"hfx_vae": "vae"}
#: suffix of config.json ``architectures[0]`` -> kind.
ARCHITECTURE_KINDS = (("ForCausalLM", "causal-lm"), ("ForSequenceClassification", "text-classifier"))
#: adapter_config.json ``task_type`` -> kind.
ADAPTER_KINDS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "text-classifier"}


def detect_kind(folder: Path) -> Artifact:
    """The :class:`Artifact` saved in ``folder``: a pipeline by its ``_class_name``; an image classifier by
    ``config.json`` + ``hfx_preprocessing.json``; a PEFT adapter by its ``task_type``; a transformers model by
    its ``model_type`` or architecture.

    Raises:
        FileNotFoundError: ``folder`` holds none of those files.
        ValueError: an artifact with no app yet (the message names it and the kinds there are).
    """
    def read(name: str) -> dict | None:
        path = folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    if (config := read("model_index.json")) is not None:
        name = config.get("_class_name")
        return _known(folder, PIPELINE_KINDS.get(name), config, f"a {name} pipeline")
    if (config := read("adapter_config.json")) is not None:
        task = config.get("task_type")
        return _known(folder, ADAPTER_KINDS.get(task), config, f"a PEFT adapter for task_type {task}", adapter=True)
    if (config := read("config.json")) is None:
        raise FileNotFoundError(f"{folder} holds no saved artifact (no model_index.json, adapter_config.json or "
                                "config.json)")
    if (folder / "hfx_preprocessing.json").is_file():
        return _known(folder, "image-classifier", config, "")
    architecture = (config.get("architectures") or [""])[0]
    kind = MODEL_TYPE_KINDS.get(config.get("model_type")) or next(
        (kind for suffix, kind in ARCHITECTURE_KINDS if isinstance(architecture, str) and architecture.endswith(suffix)), None)
    what = f"a {architecture or config.get('model_type') or config.get('architecture') or 'model'} model"
    return _known(folder, kind, config, what)


def _known(folder: Path, kind: str | None, config: dict, what: str, adapter: bool = False) -> Artifact:
    if kind is None or kind not in SPACE_KINDS:
        raise ValueError(f"{folder} holds {what}: hfx space has no app for it; it makes apps for "
                         f"{', '.join(sorted(SPACE_KINDS))}")
    return Artifact(folder, kind, config, adapter)


# ---------------------------------------------------------------------------------------------- kinds
def class_conditional(artifact: Artifact) -> SpaceApp:
    """A class-conditional diffusion pipeline (pixels or latents): class, guidance, steps, seed; the guidance
    curve of its model card."""
    body = '''
import pandas as pd
from diffusers import DiffusionPipeline

from hfx.pipelines import scheduler_from_name
from hfx.space.runtime import guidance_curve

pipe = DiffusionPipeline.from_pretrained(MODEL).to(DEVICE)  # after `import hfx`: the saved pipeline class
pipe.scheduler = scheduler_from_name("ddim", pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
CLASSES = pipe.class_names or [str(i) for i in range(pipe.num_classes)]
MAX_STEPS = min(100, pipe.scheduler.config.num_train_timesteps)
CURVE = guidance_curve(MODEL)  # the guidance measurements of the model card (written by `hfx demo`)


def generate(class_name, guidance_scale, steps, seed, num_images):
    """`num_images` samples of one class: DDIM, classifier-free guidance at `guidance_scale`."""
    return pipe([CLASSES.index(class_name)], guidance_scale=float(guidance_scale), num_inference_steps=int(steps),
                num_images_per_prompt=int(num_images), generator=torch.Generator(DEVICE).manual_seed(int(seed))).images


with gr.Blocks(title=TITLE) as demo:
    gr.Markdown(DESCRIPTION)
    with gr.Row():
        with gr.Column():
            class_name = gr.Dropdown(CLASSES, value=CLASSES[0], label="class")
            guidance = gr.Slider(0, 10, value=float(pipe.config.default_guidance_scale), step=0.1,
                                 label="guidance scale (0 unconditional, 1 conditional)")
            steps = gr.Slider(1, MAX_STEPS, value=min(25, MAX_STEPS), step=1, label="denoising steps (DDIM)")
            seed = gr.Number(0, precision=0, label="seed")
            num_images = gr.Slider(1, 16, value=8, step=1, label="images")
            button = gr.Button("Generate", variant="primary")
        gallery = gr.Gallery(label="samples", format="png", columns=4, elem_classes=PIXELS)
    button.click(generate, [class_name, guidance, steps, seed, num_images], gallery, api_name="generate")
    gr.Markdown("### Guidance against quality, as measured for the model card")
    if CURVE:
        with gr.Row():
            gr.LinePlot(pd.DataFrame(CURVE), x="guidance", y="accuracy", color="variant",
                        title="conditional accuracy (%)", x_title="guidance scale", y_title="accuracy (%)")
            gr.LinePlot(pd.DataFrame(CURVE), x="guidance", y="fid", color="variant", title="FID",
                        x_title="guidance scale", y_title="FID")
    else:
        gr.Markdown("The model card has no guidance measurements (`hfx demo` adds them).")
'''
    name = artifact.config.get("_class_name", "ClassConditionalPipeline")
    return SpaceApp("class-conditional", f"{name} demo", "Pick a class, a guidance scale, the number of denoising "
                    "steps and a seed, and sample; the plots show the guidance curve measured for the model card.",
                    body, ("generate",), "🎨")


def gan(artifact: Artifact) -> SpaceApp:
    """A GAN pipeline: class (conditional generators), truncation psi (StyleGAN-style generators), seed; a
    truncation sweep of one latent."""
    body = '''
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(MODEL).to(DEVICE)  # a GANPipeline
CLASSES = (pipe.class_names or [str(i) for i in range(pipe.num_classes)]) if pipe.num_classes else None
TRUNCATION = bool(getattr(pipe.generator, "supports_truncation", False))  # a mapping network (StyleGAN)
SWEEP = [0.0, 0.25, 0.5, 0.75, 1.0]


def generate(class_name, truncation_psi, seed, num_images):
    """`num_images` samples (of one class, for a conditional generator) from the seed's latents."""
    n = int(num_images)
    labels = {"class_labels": [CLASSES.index(class_name)] * n} if CLASSES else {"batch_size": n}
    return pipe(**labels, truncation_psi=float(truncation_psi) if TRUNCATION else 1.0,
                generator=torch.Generator(DEVICE).manual_seed(int(seed))).images


def truncation_sweep(class_name, seed):
    """The seed's latent at truncation psi 0 (the mean w) ... 1 (no truncation)."""
    return [(generate(class_name, psi, seed, 1)[0], f"psi {psi:g}") for psi in SWEEP]


with gr.Blocks(title=TITLE) as demo:
    gr.Markdown(DESCRIPTION)
    with gr.Row():
        with gr.Column():
            class_name = gr.Dropdown(CLASSES or ["-"], value=(CLASSES or ["-"])[0], label="class",
                                     visible=bool(CLASSES))
            psi = gr.Slider(0, 1, value=0.7 if TRUNCATION else 1.0, step=0.05, visible=TRUNCATION,
                            label="truncation psi (1: none; lower trades diversity for fidelity)")
            seed = gr.Number(0, precision=0, label="seed")
            num_images = gr.Slider(1, 16, value=8, step=1, label="images")
            button = gr.Button("Generate", variant="primary")
        gallery = gr.Gallery(label="samples", format="png", columns=4, elem_classes=PIXELS)
    button.click(generate, [class_name, psi, seed, num_images], gallery, api_name="generate")
    if TRUNCATION:
        gr.Markdown("### Truncation: one latent, psi from 0 to 1")
        sweep_button = gr.Button("Sweep psi")
        sweep = gr.Gallery(label="truncation sweep", format="png", columns=len(SWEEP), elem_classes=PIXELS)
        sweep_button.click(truncation_sweep, [class_name, seed], sweep, api_name="truncation_sweep")
'''
    truncation = _generator_class(artifact) == "StyleGANGenerator"
    return SpaceApp("gan", "GAN demo", "Sample the generator from a seed" + (
        "; move truncation psi, or sweep it for one latent." if truncation else "."), body,
        ("generate", "truncation_sweep") if truncation else ("generate",), "👾")


def _generator_class(artifact: Artifact) -> str | None:
    entry = artifact.config.get("generator")
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def cyclegan(artifact: Artifact) -> SpaceApp:
    """A CycleGAN pipeline: an image of one domain in, its translation to the other out."""
    body = '''
from diffusers import DiffusionPipeline
from PIL import Image

pipe = DiffusionPipeline.from_pretrained(MODEL).to(DEVICE)  # a CycleGANPipeline
A, B = pipe.domain_names
DIRECTIONS = {f"{A} -> {B}": "a_to_b", f"{B} -> {A}": "b_to_a"}
INPUTS = {"a_to_b": pipe.generator_ab.config, "b_to_a": pipe.generator_ba.config}


def translate(image, direction):
    """The image translated to the other domain (first converted and resized to what the generator takes)."""
    if image is None:
        raise gr.Error("upload an image first")
    config = INPUTS[DIRECTIONS[direction]]
    image = image.convert("L" if config.in_channels == 1 else "RGB")
    if config.sample_size and image.size != (config.sample_size, config.sample_size):
        image = image.resize((config.sample_size, config.sample_size), Image.BILINEAR)
    return pipe(image, direction=DIRECTIONS[direction]).images[0]


with gr.Blocks(title=TITLE) as demo:
    gr.Markdown(DESCRIPTION)
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="pil", label="image")
            direction = gr.Radio(list(DIRECTIONS), value=next(iter(DIRECTIONS)), label="direction")
            button = gr.Button("Translate", variant="primary")
        translated = gr.Image(label="translated", format="png", elem_classes=PIXELS)
    button.click(translate, [image, direction], translated, api_name="translate")
'''
    names = artifact.config.get("domain_names") or {"a": "A", "b": "B"}
    return SpaceApp("cyclegan", "CycleGAN demo", f"Upload an image of one domain ({names.get('a')} or {names.get('b')}): "
                    "the generator translates it to the other.", body, ("translate",), "🔁")


def vae(artifact: Artifact) -> SpaceApp:
    """An hfx VAE: prior samples, and interpolation between two seeds' latents or two uploaded images."""
    body = '''
from transformers import AutoModel

from hfx.space.runtime import to_images, to_pixels

vae = AutoModel.from_pretrained(MODEL).to(DEVICE).eval()  # an HfxVAEModel (registered by `import hfx`)
CLASSES = [str(i) for i in range(vae.config.num_classes)] if vae.config.num_classes else None
MODE = "L" if vae.config.in_channels == 1 else "RGB"


def labels(class_name, n):
    return None if CLASSES is None else torch.full((n,), CLASSES.index(class_name), device=DEVICE)


def sample(class_name, seed, num_images):
    """Decoded draws z ~ N(0, I) from the seed."""
    n = int(num_images)
    return to_images(vae.sample(n, labels(class_name, n), generator=torch.Generator(DEVICE).manual_seed(int(seed))))


@torch.no_grad()
def interpolate(class_name, seed_a, seed_b, steps):
    """`steps` decoded points on the line from the latent of seed A to that of seed B."""
    z_a, z_b = (torch.randn(vae.latent_shape, generator=torch.Generator().manual_seed(int(seed)))
                for seed in (seed_a, seed_b))
    weights = torch.linspace(0, 1, int(steps))[:, None, None, None]
    return to_images(vae.decode(((1 - weights) * z_a + weights * z_b).to(DEVICE), labels(class_name, int(steps))))


def interpolate_images(class_name, image_a, image_b, steps):
    """`steps` decoded points between the posterior means of two images (`HfxVAEModel.interpolate`)."""
    if image_a is None or image_b is None:
        raise gr.Error("upload two images")
    a, b = (to_pixels(image, vae.config.image_size, MODE).to(DEVICE) for image in (image_a, image_b))
    return to_images(vae.interpolate(a, b, steps=int(steps), labels=labels(class_name, 1)))


with gr.Blocks(title=TITLE) as demo:
    gr.Markdown(DESCRIPTION)
    class_name = gr.Dropdown(CLASSES or ["-"], value=(CLASSES or ["-"])[0], label="class", visible=bool(CLASSES))
    with gr.Tab("Interpolate"):
        with gr.Row():
            seed_a = gr.Number(0, precision=0, label="seed A")
            seed_b = gr.Number(1, precision=0, label="seed B")
            steps = gr.Slider(2, 16, value=8, step=1, label="steps")
        interpolate_button = gr.Button("Interpolate", variant="primary")
        path = gr.Gallery(label="from A to B", format="png", columns=8, elem_classes=PIXELS)
        interpolate_button.click(interpolate, [class_name, seed_a, seed_b, steps], path, api_name="interpolate")
    with gr.Tab("Interpolate two images"):
        with gr.Row():
            image_a = gr.Image(type="pil", label="image A")
            image_b = gr.Image(type="pil", label="image B")
        images_button = gr.Button("Interpolate the images")
        image_path = gr.Gallery(label="from A to B", format="png", columns=8, elem_classes=PIXELS)
        images_button.click(interpolate_images, [class_name, image_a, image_b, steps], image_path,
                            api_name="interpolate_images")
    with gr.Tab("Sample"):
        with gr.Row():
            seed = gr.Number(0, precision=0, label="seed")
            num_images = gr.Slider(1, 16, value=8, step=1, label="images")
        sample_button = gr.Button("Sample")
        samples = gr.Gallery(label="prior samples", format="png", columns=8, elem_classes=PIXELS)
        sample_button.click(sample, [class_name, seed, num_images], samples, api_name="sample")
'''
    return SpaceApp("vae", "VAE demo", "Walk the latent space: interpolate between two seeds' latents or two images, "
                    "or decode prior samples.", body, ("interpolate", "interpolate_images", "sample"), "🌀")


def image_classifier(artifact: Artifact) -> SpaceApp:
    """An image classifier (timm or transformers, with hfx_preprocessing.json): upload or draw an image; top-k
    probabilities and, with ``hfx.interpret``, the Grad-CAM overlay."""
    body = '''
from PIL import Image

from hfx.metrics.classifier import TrainedImageClassifier
from hfx.space.runtime import drawing_to_image, to_pixels

try:
    from hfx.interpret import explain, overlay
except ImportError:  # an hfx without hfx.interpret: probabilities only
    explain = overlay = None

classifier = TrainedImageClassifier(MODEL)  # the model and the preprocessing it was trained with
classifier.model.to(DEVICE)
SIZE, MODE = classifier.preprocessing["image_size"], classifier.preprocessing["mode"]
CHANNELS = 1 if MODE == "L" else 3
NUM_CLASSES = classifier.features_and_logits(torch.zeros(1, CHANNELS, SIZE, SIZE, device=DEVICE))[1].shape[-1]
LABELS = classifier.preprocessing.get("labels") or [str(i) for i in range(NUM_CLASSES)]
TOP_K = min(5, len(LABELS))
SHOWN = SIZE * max(1, 224 // SIZE)  # the side of the Grad-CAM overlay
LIGHT_INK = True  # drawings become light strokes on black, as hfx's digits are; False for dark-on-light data


def classify(image):
    """The class probabilities of an image, and where the model looked for its top class (Grad-CAM)."""
    if image is None:
        raise gr.Error("upload an image first")
    pixels = to_pixels(image, SIZE, MODE).to(DEVICE)
    _, logits = classifier.features_and_logits(pixels)
    probabilities = logits.float().softmax(-1)[0].tolist()
    heatmap = None
    if explain is not None:
        target = max(range(len(LABELS)), key=probabilities.__getitem__)
        cam = explain(classifier.model, classifier.normalise(pixels), method="gradcam", target=target).heatmaps[0]
        seen = image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)  # what the model saw, shown large
        heatmap = overlay(seen.resize((SHOWN, SHOWN), Image.NEAREST), cam)
    return dict(zip(LABELS, probabilities)), heatmap


def classify_drawing(drawing):
    """`classify` of a drawing (a Sketchpad's value)."""
    try:
        image = drawing_to_image(drawing, light_ink=LIGHT_INK)
    except ValueError as err:
        raise gr.Error(str(err)) from None
    return classify(image)


with gr.Blocks(title=TITLE) as demo:
    gr.Markdown(DESCRIPTION)
    with gr.Row():
        with gr.Column():
            with gr.Tab("Upload"):
                image = gr.Image(type="pil", label="image", image_mode="RGB")
                upload_button = gr.Button("Classify", variant="primary")
            with gr.Tab("Draw"):
                drawing = gr.Sketchpad(type="pil", label="draw here", canvas_size=(280, 280),
                                       brush=gr.Brush(colors=["#000000"], default_size=24))
                draw_button = gr.Button("Classify the drawing", variant="primary")
        with gr.Column():
            probabilities = gr.Label(num_top_classes=TOP_K, label=f"top-{TOP_K} probabilities")
            cam = gr.Image(label="Grad-CAM of the top class" if explain else "Grad-CAM (needs hfx.interpret)",
                           format="png", elem_classes=PIXELS)
    upload_button.click(classify, image, [probabilities, cam], api_name="classify")
    draw_button.click(classify_drawing, drawing, [probabilities, cam], api_name="classify_drawing")
'''
    return SpaceApp("image-classifier", "Image classifier demo", "Upload or draw an image: the top-k class "
                    "probabilities and the Grad-CAM overlay of the top class.", body, ("classify", "classify_drawing"), "🔎")


def text_classifier(artifact: Artifact) -> SpaceApp:
    """A sequence classifier (a transformers model, or a PEFT adapter on its base): text in, label
    probabilities out."""
    body = _text_model_loader(artifact, "AutoModelForSequenceClassification") + '''

LABELS = [model.config.id2label[i] for i in range(model.config.num_labels)]


@torch.no_grad()
def classify(text):
    """The label probabilities of a text."""
    batch = tokenizer([text], truncation=True, return_tensors="pt").to(DEVICE)
    probabilities = model(**batch).logits.float().softmax(-1)[0].tolist()
    return dict(zip(LABELS, probabilities))


with gr.Blocks(title=TITLE) as demo:
    gr.Markdown(DESCRIPTION)
    with gr.Row():
        with gr.Column():
            text = gr.Textbox(lines=4, label="text")
            button = gr.Button("Classify", variant="primary")
        probabilities = gr.Label(num_top_classes=min(5, len(LABELS)), label="probabilities")
    button.click(classify, text, probabilities, api_name="classify")
'''
    return SpaceApp("text-classifier", "Text classifier demo", "Type a text: the label probabilities.", body,
                    ("classify",), "🏷️")


def causal_lm(artifact: Artifact) -> SpaceApp:
    """A causal language model (or a PEFT adapter on one): prompt, new tokens, temperature, seed."""
    body = _text_model_loader(artifact, "AutoModelForCausalLM") + '''


@torch.no_grad()
def complete(prompt, max_new_tokens, temperature, seed):
    """The prompt and its continuation: greedy at temperature 0, else sampled from the seed."""
    torch.manual_seed(int(seed))
    batch = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False).to(DEVICE)
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0}
    else:
        sampling = {"do_sample": False}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**batch, max_new_tokens=int(max_new_tokens), pad_token_id=pad, **sampling)
    return prompt + tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


with gr.Blocks(title=TITLE) as demo:
    gr.Markdown(DESCRIPTION)
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(lines=4, value="def ", label="prompt")
            max_new_tokens = gr.Slider(1, 256, value=48, step=1, label="new tokens")
            temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="temperature (0: greedy)")
            seed = gr.Number(0, precision=0, label="seed")
            button = gr.Button("Complete", variant="primary")
        completion = gr.Textbox(lines=12, label="completion")
    button.click(complete, [prompt, max_new_tokens, temperature, seed], completion, api_name="complete")
'''
    return SpaceApp("causal-lm", "Language model demo", "Give a prompt: the model continues it.", body,
                    ("complete",), "✍️")


def _text_model_loader(artifact: Artifact, auto: str) -> str:
    """Source that sets ``model`` and ``tokenizer``: the saved model, or an adapter on its base model."""
    if not artifact.is_adapter:
        return f'''
from transformers import {auto}, AutoTokenizer

model = {auto}.from_pretrained(MODEL).to(DEVICE).eval()
tokenizer = AutoTokenizer.from_pretrained(MODEL)'''
    base = f"BASE = {artifact.config.get('base_model_name_or_path')!r}"
    labels = _adapter_labels(artifact.folder) if auto == "AutoModelForSequenceClassification" else None
    if labels:  # the adapter's files do not record them; its model card does
        head = (f"\n# The labels, from the adapter's model card.\nID2LABEL = {pprint.pformat(labels, width=110)}\n"
                f"base = {auto}.from_pretrained(resolve_pretrained(BASE), id2label=ID2LABEL)")
    else:
        head = f"\nbase = {auto}.from_pretrained(resolve_pretrained(BASE))"
    return f'''
from peft import PeftModel
from transformers import {auto}, AutoTokenizer

from hfx.models import resolve_pretrained

# The adapter's base model: a Hub repo, or a checkpoint a package ships (all-MiniLM-L6-v2, found offline).
{base + ("  # noqa: E501" if len(base) > 110 else "")}{head}
model = PeftModel.from_pretrained(base, MODEL).to(DEVICE).eval()
tokenizer = AutoTokenizer.from_pretrained(MODEL)'''


def _adapter_labels(folder: Path) -> dict[int, str] | None:
    """The labels of a sequence-classification adapter, from the ``id2label = {...}`` line of the load snippet
    in its hfx model card (an adapter's files do not record them); None when the card has no such line."""
    card = folder / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    match = re.search(r"^id2label = (\{.*\})$", text, re.MULTILINE)
    try:
        labels = ast.literal_eval(match[1]) if match else None
    except (ValueError, SyntaxError):
        return None
    return labels if isinstance(labels, dict) else None


#: kind -> the function that writes its app. One line per kind.
SPACE_KINDS: dict[str, Callable[[Artifact], SpaceApp]] = {
    "class-conditional": class_conditional,
    "gan": gan,
    "cyclegan": cyclegan,
    "vae": vae,
    "image-classifier": image_classifier,
    "text-classifier": text_classifier,
    "causal-lm": causal_lm,
}
