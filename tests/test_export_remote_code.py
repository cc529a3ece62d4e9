"""The remote-code export of every hfx artifact kind (class-conditional and latent diffusion pipelines with an
HfxVAEModel or a diffusers AutoencoderKL, an HfxVAEModel alone, a NoisyClassifier alone), loaded from the
export folder and by repo id from the loopback Hub in a process that cannot import hfx; the one-file modules
the export generates; and the one-line errors of `hfx export` on bad input."""

from __future__ import annotations

import ast
import json
import re
import sys
import textwrap

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
from diffusers.utils.dynamic_modules_utils import get_relative_imports
from hub_server import hub_environment, hub_fixture  # noqa: F401  (the `hub` fixture)
from safetensors.torch import save_file
from test_hub import BLOCK_HFX, NUM_CLASSES, run_child, snippet_of, tiny_pipeline, tiny_vae

import hfx
from hfx.cli import main
from hfx.hub import push
from hfx.hub.export import bundle_module
from hfx.models.noisy_classifier import NoisyClassifier
from hfx.pipelines import LatentDiffusionPipeline

LATENT_CHANNELS, LATENT_SIDE = 2, 4  # tiny_vae's latents: 2 x 4 x 4 for 8 x 8 images


# ------------------------------------------------------------------------------------------ artifacts
def tiny_classifier(in_channels: int = 1, sample_size: int = 8) -> NoisyClassifier:
    torch.manual_seed(3)
    return NoisyClassifier(sample_size=sample_size, in_channels=in_channels, num_classes=NUM_CLASSES,
                           block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                           norm_num_groups=4).eval()


def tiny_ldm(vae=None, classifier: bool = True) -> LatentDiffusionPipeline:
    """A latent diffusion pipeline on tiny_vae's latents (or ``vae``'s), with a latent noisy classifier."""
    vae = tiny_vae(0) if vae is None else vae
    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=LATENT_SIDE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
                       num_class_embeds=NUM_CLASSES + 1)
    pipe = LatentDiffusionPipeline(vae=vae, unet=unet.eval(), scheduler=DDIMScheduler(num_train_timesteps=50,
                                                                                      clip_sample=False),
                                   classifier=tiny_classifier(LATENT_CHANNELS, LATENT_SIDE) if classifier else None,
                                   class_names=["zero", "one", "two"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_autoencoder_kl() -> AutoencoderKL:
    torch.manual_seed(2)
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=8).eval()


def sample(pipe, classifier_scale: float) -> torch.Tensor:
    return torch.from_numpy(pipe([0, 2], num_inference_steps=3, classifier_scale=classifier_scale, output_type="np",
                                 generator=torch.Generator().manual_seed(0)).images)


# ------------------------------------------------------------------------------------------ loading without hfx
CHILD_NO_HFX = BLOCK_HFX + r"""
import torch
from diffusers import AutoModel as DiffusersAutoModel, DiffusionPipeline
from safetensors.torch import load_file
from transformers import AutoModel

torch.set_num_threads(1)  # as in the parent: the same reduction order, bit-identical outputs
spec = json.loads(sys.argv[1])
expected = load_file(spec["expected"])
with torch.no_grad():
    for name, scale in spec["pipelines"].items():
        for source in (spec["dirs"][name], spec["repos"][name]):
            pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            images = pipe([0, 2], num_inference_steps=3, classifier_scale=scale, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images
            assert torch.equal(torch.from_numpy(images), expected[name]), f"{name} from {source}: images differ"
    for source in (spec["dirs"]["vae"], spec["repos"]["vae"]):
        model = AutoModel.from_pretrained(source, trust_remote_code=True)
        assert torch.equal(model.decode(expected["z"]), expected["vae"]), source
    for source in (spec["dirs"]["classifier"], spec["repos"]["classifier"]):
        model = DiffusersAutoModel.from_pretrained(source, trust_remote_code=True)
        assert torch.equal(model(expected["x"], expected["t"]).logits, expected["classifier"]), source
for snippet in spec["snippets"]:
    exec(snippet, {})
assert not [m for m in sys.modules if m == "hfx" or m.startswith("hfx.")]
print("remote code OK:", len(spec["snippets"]), "snippets ran")
"""


@pytest.mark.slow
def test_every_artifact_kind_loads_without_hfx_from_the_export_and_the_hub(hub, tmp_path):
    """Exported with `hfx export`, pushed with `push(remote_code=True)`: a process where hfx cannot be imported
    loads each from the folder and from the repo id, and computes exactly what the original computes."""
    pipelines = {"ldm": (tiny_ldm(), 1.0), "ldm_kl": (tiny_ldm(tiny_autoencoder_kl(), classifier=False), 0.0),
                 "class_conditional": (tiny_pipeline(), 1.0)}
    expected = {name: sample(pipe, scale) for name, (pipe, scale) in pipelines.items()}
    for name, (pipe, _) in pipelines.items():
        pipe.save_pretrained(tmp_path / name)
    z = torch.randn(2, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 40])
    vae, classifier = tiny_vae(0), tiny_classifier()
    vae.save_pretrained(tmp_path / "vae")
    classifier.save_pretrained(tmp_path / "classifier")
    with torch.no_grad():
        expected.update(z=z, x=x, t=t, vae=vae.decode(z), classifier=classifier(x, t).logits)
    save_file(expected, str(tmp_path / "expected.safetensors"))

    names = [*pipelines, "vae", "classifier"]
    dirs = {name: tmp_path / f"{name}-export" for name in names}
    for name in names:
        assert main(["export", str(tmp_path / name), "--remote-code", "--out", str(dirs[name])]) == 0

    # Each hfx module ships as one file where diffusers fetches it; nothing imports hfx or a sibling file.
    ldm = dirs["ldm"]
    index = json.loads((ldm / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latent_diffusion", "LatentDiffusionPipeline"]
    assert index["vae"] == ["modeling_vae", "HfxVAEModel"]
    assert index["classifier"] == ["modeling_noisy_classifier", "NoisyClassifier"]
    assert json.loads((dirs["ldm_kl"] / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    assert sorted(p.name for p in (ldm / "vae").iterdir()) == ["config.json", "model.safetensors", "modeling_vae.py"]
    assert not list(ldm.glob("pipeline_class_conditional.py"))  # inlined into pipeline_latent_diffusion.py
    shipped = [ldm / "pipeline_latent_diffusion.py", ldm / "vae" / "modeling_vae.py",
               ldm / "classifier" / "modeling_noisy_classifier.py",
               dirs["class_conditional"] / "pipeline_class_conditional.py",
               dirs["classifier"] / "modeling_noisy_classifier.py"]
    for path in shipped:
        assert get_relative_imports(str(path)) == [], path
        assert not re.search(r"^\s*(from|import)\s+hfx\b", path.read_text(), re.MULTILINE), path
    assert "class HfxVAEConfig(PreTrainedConfig)" in (ldm / "vae" / "modeling_vae.py").read_text()
    classifier_config = json.loads((dirs["classifier"] / "config.json").read_text())
    assert classifier_config["auto_map"] == {"AutoModel": "modeling_noisy_classifier.NoisyClassifier"}
    # The transformers model keeps its two real files: transformers fetches `from .x import` siblings itself.
    assert {"configuration_vae.py", "modeling_vae.py"} <= {p.name for p in dirs["vae"].iterdir()}

    repos = {name: hub.new_repo_id(name.replace("_", "-")) for name in names}
    for name in names:
        push(tmp_path / name, repos[name], remote_code=True)
    assert {"pipeline_latent_diffusion.py", "vae/modeling_vae.py"} <= set(hub.files(repos["ldm"]))
    # The cards' load snippets, run below: the pushed pipeline's (by repo id) and the exported folders' own.
    snippets = [snippet_of(hub.files(repos["ldm"])["README.md"].decode()),
                *(snippet_of((dirs[name] / "README.md").read_text()) for name in ("ldm_kl", "classifier"))]
    assert all("trust_remote_code=True" in s and not re.search(r"\bimport hfx|from hfx", s) for s in snippets), snippets
    assert repos["ldm"] in snippets[0] and str(dirs["classifier"]) in snippets[2]
    assert "from diffusers import AutoModel" in snippets[2]  # a diffusers model: not transformers' AutoModel

    spec = json.dumps({"expected": str(tmp_path / "expected.safetensors"), "dirs": {k: str(v) for k, v in dirs.items()},
                       "repos": repos, "pipelines": {name: scale for name, (_, scale) in pipelines.items()},
                       "snippets": snippets})
    env = {**hub_environment(hub.url), "HF_HOME": str(tmp_path / "child-hf-home")}
    assert "remote code OK: 3 snippets ran" in run_child(CHILD_NO_HFX, env, tmp_path, spec)


# ------------------------------------------------------------------------------------------ one-file modules
@pytest.fixture
def probe_package(tmp_path, monkeypatch):
    """Write modules of a throw-away subpackage of hfx (``hfx.<name>``) and return a writer."""
    root = tmp_path / "extra"
    monkeypatch.setattr(hfx, "__path__", [*hfx.__path__, str(root)])
    written = []

    def write(name: str, files: dict[str, str]) -> str:
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        for file, text in files.items():
            (folder / file).write_text(textwrap.dedent(text))
        written.append(f"hfx.{name}")
        return f"hfx.{name}"

    yield write
    for module in [m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in written)]:
        del sys.modules[module]


def run_module_text(text: str) -> dict:
    tree = ast.parse(text)
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or n.module.startswith("hfx"))]
    namespace = {"__name__": "exported_module"}
    exec(compile(tree, "exported_module.py", "exec"), namespace)
    return namespace


def test_a_module_and_what_it_imports_become_one_file(probe_package):
    """Relative and absolute imports are inlined (through a package's re-export, with renames); a torch
    module class named only in annotations becomes torch.nn.Module; the target's docstring opens the file."""
    package = probe_package("probe_bundle", {
        "layers.py": '''\
            """Layers."""
            import torch
            __all__ = ["Scale", "double"]

            def double(x):
                return 2 * x

            class Scale(torch.nn.Module):
                def forward(self, x):
                    return double(x)

            class Annotated(torch.nn.Module):
                pass
            ''',
        "__init__.py": "from .layers import Scale as PublicScale\n",
        "model.py": '''\
            """The model module."""
            from __future__ import annotations

            import torch

            from hfx.probe_bundle import PublicScale
            from .layers import Annotated, double as twice

            def run(x: torch.Tensor, helper: Annotated | None = None) -> torch.Tensor:
                return PublicScale()(twice(x))
            __all__ = ["run"]
            ''',
    })
    text = bundle_module(f"{package}.model")
    assert text.startswith('"""The model module."""')
    assert text.index("# ---------------- hfx/probe_bundle/layers.py") < text.index("# ---------------- hfx/probe_bundle/model.py")
    assert "from torch.nn import Module as Annotated" not in text  # layers.py is inlined: the real class is there
    namespace = run_module_text(text)
    assert torch.equal(namespace["run"](torch.ones(2)), torch.full((2,), 4.0))
    assert namespace["__all__"] == ["run"]  # the inlined module's __all__ is dropped


def test_annotation_only_component_classes_stand_in_as_torch_modules(probe_package):
    package = probe_package("probe_stand_in", {
        "component.py": "import torch\n\nclass Component(torch.nn.Module):\n    pass\n",
        "pipeline.py": '''\
            from __future__ import annotations

            from .component import Component

            def build(component: Component) -> str:
                return type(component).__name__
            ''',
    })
    text = bundle_module(f"{package}.pipeline")
    assert "class Component" not in text
    assert "from torch.nn import Module as Component" in text
    assert run_module_text(text)["build"](torch.nn.Identity()) == "Identity"


def test_modules_that_cannot_merge_are_refused_by_name(probe_package):
    package = probe_package("probe_refused", {
        "a.py": "def helper():\n    return 1\n",
        "b.py": "from .a import helper as one\n\ndef helper():\n    return one() + 1\n",
        "lazy.py": "def f():\n    from .a import helper\n    return helper()\n",
        "cycle_a.py": "def f():\n    return g()\n\nfrom .cycle_b import g\n",  # a cycle Python itself accepts
        "cycle_b.py": "from .cycle_a import f\n\ndef g():\n    return 1\n",
    })
    with pytest.raises(ValueError, match=r"probe_refused/b\.py and hfx/probe_refused/a\.py both define 'helper'"):
        bundle_module(f"{package}.b")
    with pytest.raises(ValueError, match=r"lazy\.py:2: .* inside a function or block"):
        bundle_module(f"{package}.lazy")
    with pytest.raises(ValueError, match="import cycle"):
        bundle_module(f"{package}.cycle_a")


# ------------------------------------------------------------------------------------------ bad input
def export_error(capsys, *args: str) -> str:
    """Run `hfx export` expecting failure; return its one-line error message."""
    capsys.readouterr()
    assert main(["export", *map(str, args), "--remote-code"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hfx export: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_bad_input_ends_in_one_line_naming_the_path(tmp_path, capsys):
    tiny_vae(0).save_pretrained(tmp_path / "vae")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")

    assert str(a_file) in export_error(capsys, tmp_path / "vae", "--out", a_file / "export")  # under a file
    assert str(a_file) in export_error(capsys, tmp_path / "vae", "--out", a_file)  # a file
    assert str(a_file) in export_error(capsys, tmp_path / "vae", "--out", a_file, "--overwrite")
    assert a_file.read_text() == "not a folder"
    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in export_error(capsys, tmp_path / "empty")  # not an artifact
    assert str(a_file) in export_error(capsys, a_file)
    keep = tmp_path / "keep"
    (keep / "data").mkdir(parents=True)
    assert "not an export" in export_error(capsys, tmp_path / "vae", "--out", keep, "--overwrite")
    assert (keep / "data").is_dir()
    assert "overlap" in export_error(capsys, tmp_path / "vae", "--out", tmp_path / "vae" / "rc")

    # A good export, then the artifact breaks: --overwrite fails and leaves the earlier export as it was.
    assert main(["export", str(tmp_path / "vae"), "--remote-code", "--out", str(tmp_path / "rc")]) == 0
    before = files_of(tmp_path / "rc")
    weights = tmp_path / "vae" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    err = export_error(capsys, tmp_path / "vae", "--out", tmp_path / "rc", "--overwrite")
    assert str(weights) in err and "truncated or corrupt" in err
    assert files_of(tmp_path / "rc") == before
    weights.write_bytes(b"\x00" * 64)  # corrupt
    assert str(weights) in export_error(capsys, tmp_path / "vae", "--out", tmp_path / "rc2")
    weights.unlink()
    assert "no weights" in export_error(capsys, tmp_path / "vae", "--out", tmp_path / "rc2")
    (tmp_path / "vae" / "config.json").write_text('{"model_type": "hfx_vae",')  # truncated JSON
    assert str(tmp_path / "vae" / "config.json") in export_error(capsys, tmp_path / "vae", "--out", tmp_path / "rc2")
    assert not (tmp_path / "rc2").exists() and not (tmp_path / "rc2.tmp").exists()

    # A pipeline whose component file is truncated: the message names the component's file.
    tiny_ldm(classifier=False).save_pretrained(tmp_path / "ldm")
    vae_weights = tmp_path / "ldm" / "vae" / "model.safetensors"
    vae_weights.write_bytes(vae_weights.read_bytes()[:200])
    assert str(vae_weights) in export_error(capsys, tmp_path / "ldm", "--out", tmp_path / "ldm-rc")
    assert not (tmp_path / "ldm-rc").exists()
