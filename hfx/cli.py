"""The ``hfx`` command line: ``hfx <command> [options]``; ``python -m hfx`` is the same.

Each command is a pair of small functions below, ``_add_<name>`` (its arguments) and ``_run_<name>``
(the call into the library), listed once in :data:`COMMANDS`. Heavy imports happen inside the run
functions so ``hfx --help`` answers quickly.

Exit status: 0 on success, 2 on a usage error (argparse), 1 when the command fails on bad input; such a
failure prints one line naming the problem (set ``HFX_TRACEBACK=1`` for the full traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable
from importlib import metadata

# Distributions reported by `hfx env`, in the order users look for them.
STACK = ["hfx", "torch", "torchvision", "transformers", "diffusers", "peft", "accelerate", "datasets", "timm",
         "evaluate", "open_clip_torch", "huggingface_hub", "safetensors", "tokenizers", "numpy", "scipy", "scikit-learn"]


# ---------------------------------------------------------------------------------------------- env
def _add_env(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def environment_report() -> dict[str, str]:
    """Versions of Python, torch and the HF stack, and what the devices can do (like ``transformers env``)."""
    report = {"platform": platform.platform(), "python": platform.python_version()}
    for name in STACK:
        try:
            report[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            report[name] = "not installed"
    import torch

    report["torch"] = torch.__version__  # carries the build tag (+cu130, +cpu)
    report["cpu threads"] = str(torch.get_num_threads())
    report["cuda available"] = str(torch.cuda.is_available())
    if torch.cuda.is_available():
        report["cuda version"] = str(torch.version.cuda)
        report["gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        report["bf16 supported (gpu)"] = str(torch.cuda.is_bf16_supported())
    else:
        report["gpus"] = "none"
    report["mps available"] = str(bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()))
    report["bf16 autocast (cpu)"] = str(_cpu_bf16_works(torch))
    for var in ("HF_HOME", "HF_ENDPOINT", "HF_HUB_OFFLINE", "ACCELERATE_USE_CPU"):
        if os.environ.get(var):
            report[var] = os.environ[var]
    return report


def _cpu_bf16_works(torch) -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        return out.dtype == torch.bfloat16
    except RuntimeError:
        return False


def _run_env(args: argparse.Namespace) -> int:
    report = environment_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("Copy-and-paste the text below in your GitHub issue.\n")
        width = max(map(len, report))
        for key, value in report.items():
            print(f"- {key + ':':<{width + 1}} {value}")
    return 0


# -------------------------------------------------------------------------------------------- train
def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a recipe: a YAML file or a shipped recipe name (classify-digits, lm-stdlib)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override recipe values, e.g. train.max_steps=100 optimizer.lr=3e-4 "
                             "resume_from_checkpoint=latest")
    _add_threads(parser)


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="torch CPU threads per process (default: OMP_NUM_THREADS if set, else the cores that are "
                             "idle now, shared among this machine's processes)")


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    return value


def _device(name: str | None) -> str:
    """``--device``: a torch device that exists here (default: cuda when available, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    available = {"cuda": torch.cuda.is_available, "mps": lambda: bool(getattr(torch.backends, "mps", None)
                                                                        and torch.backends.mps.is_available())}
    if device.type in available and not available[device.type]():
        raise ValueError(f"--device {name}: no {device.type} device is available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _image_path(out: str) -> str:
    """``--out`` of an image: a file path with an image extension PIL writes, not a folder."""
    from pathlib import Path

    from PIL import Image

    if Path(out).is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of an image file, e.g. {Path(out) / 'grid.png'}")
    if Path(out).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: {Path(out).suffix or 'no extension'} is not an image format; use .png or .jpg")
    return out


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """How many torch intra-op threads this process should use, and why: ``requested`` (``--threads``) wins,
    then ``OMP_NUM_THREADS``; else the cores not busy now (the 1-minute load average subtracted, rounded down),
    shared among the processes a launcher started on this machine, at least 1. On a 2-core machine that is
    running something else this is 1: torch's default of one thread per core is then many times slower (a
    diffusion step 8.8 s with 2 threads against 0.76 s with 1, measured)."""
    if requested is not None:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    idle = int(cores - load)
    return max(1, min(cores, idle) // local), f"{cores} cores, load {load:.1f}, {local} process(es)"


def _set_threads(requested: int | None) -> None:
    import logging

    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    logging.getLogger("hfx").info("torch uses %d CPU thread%s (%s)", threads, "" if threads == 1 else "s", why)


def _log_to_stderr() -> None:
    """hfx's INFO logs (checkpoints, evaluations) on the main process; warnings only on the others. One
    handler however often a command runs in a process, writing to whatever ``sys.stderr`` is then."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value):  # StreamHandler sets it once; the property follows sys.stderr instead
            pass

    main = os.environ.get("RANK", "0") == "0"
    hfx_logger = logging.getLogger("hfx")
    if not any(type(h).__name__ == "CurrentStderr" for h in hfx_logger.handlers):
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        hfx_logger.addHandler(handler)
    hfx_logger.setLevel(logging.INFO if main else logging.WARNING)


def _train(config) -> tuple[int, object]:
    from accelerate import PartialState

    from hfx.hub import HubCallback
    from hfx.trainers import NonFiniteLossError, train

    try:
        # The engine sits below hfx.hub: the card (and the push, with push_to_hub) come in as a callback.
        result = train(config, callbacks=[HubCallback(push_to_hub=config.push_to_hub)])
    except NonFiniteLossError as err:
        print(f"hfx train: error: {err}", file=sys.stderr)
        return 1, None
    if result.stop_reason == "signal":
        if PartialState().is_main_process:
            print(f"hfx train: stopped by signal {result.signal} at step {result.global_step}; checkpoint saved in "
                  f"{result.output_dir}; continue with resume_from_checkpoint=latest", file=sys.stderr)
        return 128 + result.signal, result
    return 0, result


def _run_train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from hfx.trainers import load_config

    config = load_config(args.config, args.overrides)  # every config error surfaces here, before any model
    _log_to_stderr()
    _set_threads(args.threads)
    status, result = _train(config)
    if status == 0 and PartialState().is_main_process:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()) or "no evaluation"
        if result.stop_reason == "finished":
            print(f"nothing to do: the run in {result.output_dir} finished at step {result.global_step}; {metrics}\n"
                  f"artifact: {result.final_dir}")
        else:
            print(f"trained {result.global_step} steps ({result.stop_reason}); {metrics}\nartifact: {result.final_dir}")
    return status


# --------------------------------------------------------------------------------------------- demo
def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="outputs/demo", help="where everything goes (default outputs/demo)")
    parser.add_argument("--per-class", type=_positive_int, default=30,
                        help="generated images per class for each guidance setting (default 30)")
    parser.add_argument("--steps", type=_positive_int, default=25, help="DDIM steps when sampling (default 25)")
    parser.add_argument("--diffusion", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the ddpm-digits recipe, e.g. train.max_steps=500")
    parser.add_argument("--evaluator", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the classify-digits recipe (the evaluator)")
    _add_threads(parser)


def _run_demo(args: argparse.Namespace) -> int:
    import signal

    from hfx.demo import DemoInterrupted, results_table, run_demo

    _log_to_stderr()
    _set_threads(args.threads)

    def stop(signum, frame):  # outside the trainings (which checkpoint on a signal themselves): sampling, scoring
        raise DemoInterrupted(signum, "while sampling and scoring")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        result = run_demo(args.output_dir, per_class=args.per_class, num_inference_steps=args.steps,
                          diffusion_overrides=args.diffusion, evaluator_overrides=args.evaluator)
    except DemoInterrupted as err:
        again = shlex.join(["hfx", "demo", *sys.argv[2:]]) if sys.argv[1:2] == ["demo"] else "hfx demo (the same options)"
        print(f"hfx demo: {err}; run `{again}` again to continue", file=sys.stderr)
        return 128 + err.signal
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = result.output_dir
    timing = ", ".join(f"{k} {v:.1f} min" for k, v in result.minutes.items())
    print(f"\nClass-conditional diffusion on the digits, guided by classifier-free guidance "
          f"(default scale {result.default_guidance_scale:g}); evaluator test accuracy "
          f"{100 * result.evaluator_test_accuracy:.1f} %; N = {result.n_generated} generated vs "
          f"{result.n_reference} test images.\n\n{results_table(result)}\n\n({timing})\n"
          f"pipeline:     {out}/pipeline   (ClassConditionalPipeline.from_pretrained)\n"
          f"samples:      {out}/samples.png (one row per class)\n"
          f"guidance:     {out}/guidance.png\n"
          f"results:      {out}/results.json\n"
          f"training run: {out}/diffusion (TensorBoard logs, metrics.jsonl, checkpoints)")
    return 0


# ------------------------------------------------------------------------------------------- sample
def _add_sample(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", metavar="PIPELINE_DIR",
                        help="a ClassConditionalPipeline, LatentDiffusionPipeline or GANPipeline folder or Hub repo id")
    parser.add_argument("--class", dest="classes", nargs="+", metavar="CLASS",
                        help="class ids or names; several give one row each (default: every class)")
    parser.add_argument("--n", type=_positive_int, default=16,
                        help="images per class, or images of an unconditional GAN (default 16)")
    diffusion = parser.add_argument_group("diffusion pipelines")
    diffusion.add_argument("--guidance", type=float, default=None,
                           help="classifier-free guidance scale: 0 unconditional, 1 conditional (default: the pipeline's)")
    diffusion.add_argument("--classifier-scale", type=float, default=None, help="classifier guidance scale (default 0)")
    diffusion.add_argument("--guidance-rescale", type=float, default=None, help="CFG rescale factor in [0, 1] (default 0)")
    diffusion.add_argument("--dynamic-thresholding", type=float, default=None, metavar="RATIO",
                           help="Imagen dynamic thresholding quantile, e.g. 0.995 (default: off)")
    diffusion.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default 50)")
    diffusion.add_argument("--scheduler", default=None, help="ddpm, ddim, dpm++ or saved (default ddim)")
    gan = parser.add_argument_group("GAN pipelines")
    gan.add_argument("--truncation-psi", type=float, default=None,
                     help="StyleGAN-style generators: pull w towards its mean, in [0, 1] (default 1: no truncation)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default="grid.png", help="where to write the image grid (default grid.png)")


#: ``hfx sample`` options that only one kind of pipeline takes: (attribute, flag, the kind).
_SAMPLE_ONLY_FOR = [("guidance", "--guidance", "diffusion"), ("classifier_scale", "--classifier-scale", "diffusion"),
                    ("guidance_rescale", "--guidance-rescale", "diffusion"),
                    ("dynamic_thresholding", "--dynamic-thresholding", "diffusion"), ("steps", "--steps", "diffusion"),
                    ("scheduler", "--scheduler", "diffusion"), ("truncation_psi", "--truncation-psi", "gan")]


def _load_sampling_pipeline(path: str):
    """The hfx pipeline saved in ``path`` (a folder or a Hub repo id), of the class its model_index.json names."""
    import json

    import hfx.pipelines as pipelines
    from hfx.pipelines import ClassConditionalPipeline

    folder = path if os.path.isdir(path) else ClassConditionalPipeline.download(path)
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path!r} has no model_index.json: not a folder written by save_pretrained")
    with open(index) as handle:
        name = json.load(handle).get("_class_name")
    samplers = ("ClassConditionalPipeline", "LatentDiffusionPipeline", "GANPipeline")
    if name not in samplers:
        raise ValueError(f"{path!r} holds a {name}; hfx sample samples a {', '.join(samplers[:-1])} or {samplers[-1]}")
    return getattr(pipelines, name).from_pretrained(folder)


def _run_sample(args: argparse.Namespace) -> int:
    import torch
    from diffusers.utils import make_image_grid

    from hfx.pipelines import GANPipeline, class_grid, scheduler_from_name

    _image_path(args.out)
    device = _device(args.device)
    pipe = _load_sampling_pipeline(args.pipeline)
    kind = "gan" if isinstance(pipe, GANPipeline) else "diffusion"
    for attribute, flag, only in _SAMPLE_ONLY_FOR:
        if getattr(args, attribute) is not None and only != kind:
            raise ValueError(f"{flag} applies to {only} pipelines; {args.pipeline} is a {type(pipe).__name__}")
    pipe.to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    names = pipe.class_names or []
    # A token is a class name when the pipeline has that name, else an id when it reads as an integer.
    classes = [c if c in names or not c.lstrip("-").isdigit() else int(c) for c in args.classes or []]
    if kind == "gan":
        psi = 1.0 if args.truncation_psi is None else args.truncation_psi
        if pipe.num_classes is None:
            if classes:
                raise ValueError(f"--class given, but {args.pipeline} is an unconditional GAN: use --n alone")
            images = pipe(batch_size=args.n, truncation_psi=psi, generator=generator).images
            cols = min(args.n, max(1, round(args.n ** 0.5)))
            rows = -(-args.n // cols)
            images += [images[0].point(lambda _: 0)] * (rows * cols - args.n)
        else:
            classes = classes or list(range(pipe.num_classes))
            labels = [c for c in classes for _ in range(args.n)]
            images = pipe(class_labels=labels, truncation_psi=psi, generator=generator).images
            rows, cols = len(classes), args.n
        grid = make_image_grid(images, rows=rows, cols=cols)
    else:
        scheduler = args.scheduler or "ddim"
        if scheduler != "saved":
            pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config)
        grid = class_grid(
            pipe, classes or list(range(pipe.num_classes)), args.n, guidance_scale=args.guidance,
            classifier_scale=args.classifier_scale or 0.0, guidance_rescale=args.guidance_rescale or 0.0,
            dynamic_thresholding_ratio=args.dynamic_thresholding, num_inference_steps=args.steps or 50,
            generator=generator,
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({grid.width}x{grid.height} px)")
    return 0


# ----------------------------------------------------------------------------------------- evaluate
def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--generated", metavar="DIR", help="folder of generated images (searched recursively)")
    source.add_argument("--pipeline", metavar="PIPELINE_DIR",
                        help="sample the generated images from this ClassConditionalPipeline instead")
    sampling = parser.add_argument_group("sampling (with --pipeline)")
    sampling.add_argument("--num-images", type=_positive_int, default=1000,
                          help="images to sample, classes in turn (default 1000)")
    sampling.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default 50)")
    sampling.add_argument("--guidance", type=float, default=None,
                          help="classifier-free guidance scale (default: the pipeline's)")
    sampling.add_argument("--scheduler", default="ddim", help="ddpm, ddim, dpm++ or saved (default ddim)")
    sampling.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--reference", required=True, metavar="SPEC",
                        help="a folder of images, a .npz written by --save-reference (or pytorch-fid mu/sigma: "
                             "FID only), or a dataset hfx.data.load knows, optionally with a split: digits:test")
    parser.add_argument("--extractor", required=True, metavar="SPEC",
                        help="inception:<weights.pth>, timm:<model>[:<weights>], timm:local-dir:<folder>, "
                             "open_clip:<model>[:<weights>], open_clip:local-dir:<folder>, hf:<save_pretrained "
                             "folder>; 'random' for random weights")
    parser.add_argument("--image-column", default="image", help="image column of a dataset reference (default image)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="use at most this many images per side")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per extractor batch (default 64)")
    parser.add_argument("--kid-subsets", type=_positive_int, default=100, help="KID subsets (default 100)")
    parser.add_argument("--kid-subset-size", type=_positive_int, default=1000,
                        help="KID subset size, lowered to the smaller side (default 1000)")
    parser.add_argument("--k", type=_positive_int, default=3, help="neighbourhood size of precision/recall (default 3)")
    parser.add_argument("--is-splits", type=_positive_int, default=10, help="Inception Score splits (default 10)")
    parser.add_argument("--save-reference", metavar="NPZ", help="also save the reference features and statistics here")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _image_files(folder) -> list:
    from hfx.data.loading import IMAGE_EXTENSIONS

    return [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]


def _open_images(files):
    from PIL import Image

    for path in files:
        with Image.open(path) as image:
            yield image.convert("RGB") if image.mode not in ("L", "RGB") else image.copy()


def _sampled_images(args: argparse.Namespace, device: str):
    """Images ``[C, H, W]`` in [0, 1] from a ClassConditionalPipeline, cycling through its classes."""
    import torch

    from hfx.pipelines import ClassConditionalPipeline, scheduler_from_name

    if args.num_images < 2:
        raise ValueError(f"--num-images must be at least 2, got {args.num_images}")
    pipe = ClassConditionalPipeline.from_pretrained(args.pipeline)
    if args.scheduler != "saved":
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device).manual_seed(args.seed)
    for start in range(0, args.num_images, args.batch_size):
        labels = [i % pipe.num_classes for i in range(start, min(start + args.batch_size, args.num_images))]
        yield from pipe(labels, guidance_scale=args.guidance, num_inference_steps=args.steps, generator=generator,
                        output_type="pt").images.cpu()


def _run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import hfx  # noqa: F401  (registers hfx architectures, so hf:<folder> extractors of hfx models load)
    from hfx.metrics.extractors import load_extractor
    from hfx.metrics.scoring import ExtractedFeatures, extract_features, generative_scores

    device = _device(args.device)
    if args.pipeline:
        extractor = load_extractor(args.extractor, device=device)
        generated = extract_features(extractor, _sampled_images(args, device), args.batch_size,
                                     total=args.num_images, description="sampling")
        generated_name = f"{args.pipeline} ({args.num_images} samples, {args.steps} {args.scheduler} steps, " \
                         f"guidance {args.guidance if args.guidance is not None else 'default'}, seed {args.seed})"
    else:
        generated_dir = Path(args.generated)
        if not generated_dir.is_dir():
            raise FileNotFoundError(f"--generated folder {args.generated!r} does not exist")
        generated_files = _image_files(generated_dir)[: args.limit]
        if not generated_files:
            raise ValueError(f"--generated folder {args.generated!r} holds no images")
        extractor = load_extractor(args.extractor, device=device)
        generated = extract_features(extractor, _open_images(generated_files), args.batch_size,
                                     total=len(generated_files), description="generated")
        generated_name = str(generated_dir)
    reference_path = Path(args.reference)
    if args.reference.endswith(".npz"):
        reference = ExtractedFeatures.load(reference_path)
        reference_name = f"{reference_path.name} (saved features)"
    elif reference_path.is_dir():
        files = _image_files(reference_path)[: args.limit]
        if not files:
            raise ValueError(f"--reference folder {args.reference!r} holds no images")
        reference = extract_features(extractor, _open_images(files), args.batch_size, total=len(files),
                                     description="reference")
        reference_name = str(reference_path)
    else:
        from hfx.data import load

        name, _, split = args.reference.partition(":")
        splits = load(name)
        if (split or "test") not in splits:
            raise ValueError(f"dataset {name!r} has no split {split or 'test'!r}; splits: {', '.join(splits)}")
        dataset = splits[split or "test"]
        if args.image_column not in dataset.column_names:
            raise ValueError(f"dataset {name!r} has no column {args.image_column!r}; columns: {dataset.column_names}")
        images = list(dataset[args.image_column])[: args.limit]
        reference = extract_features(extractor, images, args.batch_size, description="reference")
        reference_name = f"{name}:{split or 'test'}"
    if args.save_reference:
        if not isinstance(reference, ExtractedFeatures):
            raise ValueError("--save-reference needs a reference of images, not a .npz")
        reference.save(args.save_reference)
    report = generative_scores(generated, reference, extractor=extractor.describe(), kid_subsets=args.kid_subsets,
                               kid_subset_size=args.kid_subset_size, k=args.k, is_splits=args.is_splits)
    report = {"generated": generated_name, "reference": reference_name, **report}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(map(len, report))
        for key, value in report.items():
            shown = f"{value:.6g}" if isinstance(value, float) else "; ".join(value) if isinstance(value, list) else value
            print(f"{key + ':':<{width + 1}} {shown}")
    return 0


# ------------------------------------------------------------------------------- card, push, export
def _add_card(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run folder (with final/) or a saved artifact folder")
    parser.add_argument("--repo-id", default=None, help="Hub repo id for the card's load snippet (default: the local path)")
    parser.add_argument("--hardware", default=None, help="what the model trained on, for the card")
    parser.add_argument("--license", default=None, help="license identifier (default apache-2.0)")


def _run_card(args: argparse.Namespace) -> int:
    from hfx.hub import render_card

    facts = {key: value for key, value in (("repo_id", args.repo_id), ("hardware", args.hardware),
                                           ("license", args.license)) if value is not None}
    print(f"wrote {render_card(args.output_dir, **facts)}")
    return 0


def _add_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run folder (with final/) or a saved artifact folder")
    parser.add_argument("--repo-id", required=True, help="user/name or org/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument("--commit-message", default=None, help="default: 'Upload <kind> with hfx'")
    parser.add_argument("--include-checkpoints", action="store_true",
                        help="also upload checkpoint-* folders (training state; large)")
    parser.add_argument("--remote-code", action="store_true",
                        help="push the remote-code export (loads without hfx via trust_remote_code=True)")


def _run_push(args: argparse.Namespace) -> int:
    from hfx.hub import push

    url = push(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
               commit_message=args.commit_message, include_checkpoints=args.include_checkpoints,
               remote_code=args.remote_code)
    print(url)
    return 0


def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run folder (with final/) or a saved artifact folder")
    parser.add_argument("--remote-code", action="store_true", required=True,
                        help="write a copy that loads without hfx (trust_remote_code=True); the only export for now")
    parser.add_argument("--out", default=None,
                        help="folder to write (default: OUTPUT_DIR/remote-code, or ARTIFACT-remote-code)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _run_export(args: argparse.Namespace) -> int:
    from hfx.hub import export_remote_code

    print(f"wrote {export_remote_code(args.output_dir, args.out, overwrite=args.overwrite)}")
    return 0


# -------------------------------------------------------------------------------------------- space
def _add_space(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="OUTPUT_DIR|REPO_ID",
                        help="a run folder (with final/), a saved artifact folder, or a Hub repo id (the app loads it)")
    parser.add_argument("--out", default=None,
                        help="folder to write (default: OUTPUT_DIR/space for a run, ARTIFACT-space, or NAME-space)")
    parser.add_argument("--push", action="store_true", help="also upload the folder as a Gradio Space (needs --repo-id)")
    parser.add_argument("--repo-id", default=None, help="the Space to push to: user/name or org/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the Space private")


def _run_space(args: argparse.Namespace) -> int:
    from hfx.space import build_space, push_space

    if args.push and not args.repo_id:
        raise ValueError("--push needs --repo-id user/name (the Space to create or update)")
    if args.repo_id and not args.push:
        raise ValueError("--repo-id names the Space to push to: add --push")
    folder = build_space(args.source, args.out)
    manifest = json.loads((folder / ".hfx-space.json").read_text())
    print(f"wrote {folder} ({manifest['kind']} app; run it with `python {folder / 'app.py'}`)")
    if args.push:
        print(push_space(folder, args.repo_id, private=args.private))
    return 0


# name -> (one-line help, add-arguments function, run function). Add a command with one line here.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "env": ("print versions of torch and the HF stack, the devices, and CUDA/bf16 support", _add_env, _run_env),
    "train": ("train a recipe (YAML or shipped name) with key.sub=value overrides; works under accelerate launch",
              _add_train, _run_train),
    "demo": ("the main job: train class-conditional diffusion on the digits, measure guidance, write a pipeline",
             _add_demo, _run_demo),
    "sample": ("sample an image grid from a class-conditional diffusion pipeline or a GAN pipeline", _add_sample,
               _run_sample),
    "evaluate": ("FID, KID, IS, precision/recall of generated images vs a reference, with N and the extractor",
                 _add_evaluate, _run_evaluate),
    "card": ("(re)render the model card README.md of a run or artifact folder", _add_card, _run_card),
    "push": ("upload a run's final artifact, card and images to the Hub in one commit", _add_push, _run_push),
    "export": ("write a copy of an artifact that loads without hfx (--remote-code)", _add_export, _run_export),
    "space": ("write a Gradio app (a Hugging Face Space) for an artifact; --push uploads it", _add_space, _run_space),
}


def build_parser() -> argparse.ArgumentParser:
    from hfx import __version__

    parser = argparse.ArgumentParser(
        prog="hfx",
        description="hfx: modern deep-learning methods as Hugging Face ecosystem artifacts.",
        epilog="Run `hfx <command> --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"hfx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (help_text, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][2](args) or 0
    # OSError: files (a folder where a file goes, an unreadable or corrupt image: the message names the path).
    except (ValueError, OSError) as err:
        if os.environ.get("HFX_TRACEBACK"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"hfx {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hfx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
