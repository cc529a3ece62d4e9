"""Publishing to the Hub, against the loopback Hub server driven by the real huggingface_hub client: push
(one commit, no training state, retries, clear errors, no token leaks), load by repo id in fresh processes
(revisions, offline from the cache), model cards (parse, eval results, images, a load snippet that runs),
the remote-code export in a process that cannot import hfx, and the card / push / export commands."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from hub_server import VALID_TOKEN, hub_environment, hub_fixture  # noqa: F401  (the `hub` fixture)
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from PIL import Image
from safetensors.torch import save_file

from hfx.cli import main
from hfx.hub import (
    HubAuthError,
    HubCallback,
    HubUnreachableError,
    card_images,
    export_remote_code,
    push,
    render_card,
)
from hfx.hub import publish as publish_module
from hfx.models.noisy_classifier import NoisyClassifier
from hfx.models.vae import HfxVAEConfig, HfxVAEModel
from hfx.pipelines import ClassConditionalPipeline

NUM_CLASSES = 3
TRAINING_STATE = ("checkpoint-", "logs/", "optimizer", "random_states", "scaler.pt", ".hfx-card.json")


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(publish_module, "RETRY_BASE_SECONDS", 0.01)



# ------------------------------------------------------------------------------------------ artifacts
def tiny_vae(seed: int) -> HfxVAEModel:
    torch.manual_seed(seed)
    config = HfxVAEConfig(image_size=8, block_out_channels=[8, 16], latent_channels=2, norm_num_groups=4)
    return HfxVAEModel(config).eval()


def tiny_pipeline(class_names=("a", "b", "c")) -> ClassConditionalPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=NUM_CLASSES + 1)
    classifier = NoisyClassifier(sample_size=8, num_classes=NUM_CLASSES, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"))
    pipe = ClassConditionalPipeline(unet.eval(), DDPMScheduler(num_train_timesteps=50), classifier=classifier.eval(),
                                    class_names=class_names)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_vae_run(root: Path, seed: int = 0) -> Path:
    """A run folder as the engine writes it: final/, checkpoints, logs, config, curves, results."""
    run = root / f"vae-run-{seed}"
    tiny_vae(seed).save_pretrained(run / "final")
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoint-10" / "optimizer.bin").write_bytes(b"optimizer state")
    (run / "checkpoint-10" / "random_states_0.pkl").write_bytes(b"rng")
    (run / "samples").mkdir()
    for step in (5, 10):  # two series, two steps: the card shows the newest of each
        for series in ("samples", "reconstructions"):
            Image.new("L", (16, 16), color=step * 10).save(run / "samples" / f"{series}-step-{step:07d}.png")
    (run / "logs").mkdir()
    (run / "logs" / "events.out.tfevents.1.host").write_bytes(b"tensorboard")
    (run / "config.yaml").write_text(textwrap.dedent(f"""\
        task: vae
        seed: {seed}
        data:
          dataset: digits
          eval_split: test
          max_eval_samples: 64
        output_dir: {run}
        """))
    records = [{"step": s, "epoch": 0, "loss": 5.0 / s, "lr": 1e-3} for s in range(1, 11)]
    records.append({"step": 10, "eval/neg_elbo": 3.25, "eval/kl": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "results.json").write_text(json.dumps({"step": 10, "train_seconds": 90.0, "eval/neg_elbo": 3.25,
                                                  "eval/kl": 0.5}))
    return run


def uploaded(hub, repo_id: str, revision: str = "main") -> set[str]:
    return set(hub.files(repo_id, revision)) - {".gitattributes"}


def snippet_of(card_text: str) -> str:
    match = re.search(r"## How to load it.*?```python\n(.*?)```", card_text, re.DOTALL)
    assert match, "the card has no load snippet"
    return match.group(1)


def run_child(script: str, env: dict[str, str], tmp_path: Path, *args: str) -> str:
    path = tmp_path / "child.py"
    path.write_text(script)
    result = subprocess.run([sys.executable, str(path), *args], env={**os.environ, **env}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


# ------------------------------------------------------------------------------------------ the server
def test_loopback_hub_speaks_the_real_client_protocol(hub, tmp_path):
    api = HfApi()
    repo_id = hub.new_repo_id()
    assert api.create_repo(repo_id) == f"{hub.url}/{repo_id}"
    api.create_repo(repo_id, exist_ok=True)  # 409 -> fine
    with pytest.raises(Exception, match="409"):
        api.create_repo(repo_id)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.safetensors").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "notes.txt").write_text("first")
    first = api.upload_folder(repo_id=repo_id, folder_path=tmp_path)
    (tmp_path / "notes.txt").write_text("second")
    api.upload_file(path_or_fileobj=str(tmp_path / "notes.txt"), path_in_repo="notes.txt", repo_id=repo_id)
    assert hub.lfs_paths(repo_id) == {"sub/weights.safetensors"}
    assert Path(hf_hub_download(repo_id, "notes.txt")).read_text() == "second"
    assert Path(hf_hub_download(repo_id, "notes.txt", revision=first.oid)).read_text() == "first"
    assert Path(hf_hub_download(repo_id, "sub/weights.safetensors")).read_bytes() == bytes(range(256)) * 4
    tree = {f.path for f in api.list_repo_tree(repo_id, recursive=True)}
    assert tree == {".gitattributes", "notes.txt", "sub", "sub/weights.safetensors"}
    api.delete_file("notes.txt", repo_id=repo_id)
    assert "notes.txt" not in hub.files(repo_id)
    with pytest.raises(Exception, match="401"):
        HfApi(token="hf_wrong_token_000000000000000000").create_repo(hub.new_repo_id())


# ------------------------------------------------------------------------------------------ push + load
CHILD_LOAD = r"""
import json, sys, torch
import hfx
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel
from hfx.pipelines import ClassConditionalPipeline

torch.set_num_threads(1)  # as in the parent: the same reduction order, bit-identical outputs
spec = json.loads(sys.argv[1])
expected = load_file(spec["expected"])
z = expected["z"]

def same(name, got):
    assert torch.equal(got, expected[name]), f"{name}: outputs differ from the local artifact"

with torch.no_grad():
    same("vae_v2", AutoModel.from_pretrained(spec["vae"]).decode(z))
    same("vae_v1", AutoModel.from_pretrained(spec["vae"], revision=spec["vae_v1_sha"]).decode(z))
    same("vae_v1", AutoModel.from_pretrained(spec["vae"], revision="dev").decode(z))
    for revision in (None, spec["pipeline_sha"]):
        pipe = ClassConditionalPipeline.from_pretrained(spec["pipeline"], revision=revision)
        pipe.set_progress_bar_config(disable=True)
        same("pipeline", torch.from_numpy(pipe([0, 1, 2], num_inference_steps=3, output_type="np",
                                               generator=torch.Generator().manual_seed(0)).images))
    peft = PeftModel.from_pretrained(AutoModel.from_pretrained(spec["vae"]), spec["adapter"])
    same("adapter", peft.get_base_model().decode(z))
for snippet in spec["snippets"]:
    exec(snippet, {})
print("loaded", len(spec["snippets"]), "snippets ran")
"""


@pytest.mark.slow
def test_push_model_pipeline_adapter_then_load_by_repo_id_in_fresh_processes(hub, tmp_path):
    from peft import LoraConfig, get_peft_model

    z = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = {"z": z}
    vae_repo, pipe_repo, adapter_repo = hub.new_repo_id("vae"), hub.new_repo_id("pipe"), hub.new_repo_id("adapter")

    # Model: v1 on main (also to branch dev), then v2 on main.
    run_v1, run_v2 = make_vae_run(tmp_path, seed=0), make_vae_run(tmp_path, seed=1)
    with torch.no_grad():
        expected["vae_v1"] = tiny_vae(0).decode(z)
        expected["vae_v2"] = tiny_vae(1).decode(z)
    url_v1 = push(run_v1, vae_repo)
    assert url_v1.startswith(f"{hub.url}/{vae_repo}/commit/")
    vae_v1_sha = url_v1.rsplit("/", 1)[1]
    push(run_v1, vae_repo, revision="dev")
    push(run_v2, vae_repo, commit_message="v2")
    files = uploaded(hub, vae_repo)
    assert {"config.json", "model.safetensors", "README.md", "images/loss.png", "images/samples-step-0000010.png",
            "images/reconstructions-step-0000010.png"} <= files
    assert not [f for f in files if f.startswith(TRAINING_STATE)], files
    assert "model.safetensors" in hub.lfs_paths(vae_repo)
    assert hub.files(vae_repo)["model.safetensors"] == (run_v2 / "final" / "model.safetensors").read_bytes()

    # Pipeline (a bare save_pretrained folder with an hfx component), card rendered by push.
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    expected["pipeline"] = torch.from_numpy(pipe([0, 1, 2], num_inference_steps=3, output_type="np",
                                                 generator=torch.Generator().manual_seed(0)).images)
    pipeline_sha = push(tmp_path / "pipe", pipe_repo).rsplit("/", 1)[1]
    assert {"model_index.json", "unet/config.json", "classifier/config.json", "README.md"} <= uploaded(hub, pipe_repo)

    # Adapter: LoRA on the pushed model, loaded from its repo id (so the adapter names it as base).
    torch.manual_seed(2)
    base = HfxVAEModel.from_pretrained(vae_repo)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=r".*blocks\.\d+\.conv[12]", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected["adapter"] = peft_model.get_base_model().decode(z)
    render_card(tmp_path / "adapter")
    push(tmp_path / "adapter", adapter_repo)
    adapter_card = hub.files(adapter_repo)["README.md"].decode()
    assert ModelCard(adapter_card).data.base_model == vae_repo

    save_file({k: v.contiguous() for k, v in expected.items()}, str(tmp_path / "expected.safetensors"))
    snippets = [snippet_of(hub.files(repo)["README.md"].decode()) for repo in (vae_repo, pipe_repo, adapter_repo)]
    assert all(repo in s for repo, s in zip((vae_repo, pipe_repo, adapter_repo), snippets))
    spec = json.dumps({"expected": str(tmp_path / "expected.safetensors"), "vae": vae_repo, "vae_v1_sha": vae_v1_sha,
                       "pipeline": pipe_repo, "pipeline_sha": pipeline_sha, "adapter": adapter_repo,
                       "snippets": snippets})
    env = {**hub_environment(hub.url), "HF_HOME": str(tmp_path / "child-hf-home")}
    assert "3 snippets ran" in run_child(CHILD_LOAD, env, tmp_path, spec)

    # Offline from the cache the first process filled: no request reaches the server.
    requests_before = len(hub.requests)
    assert "3 snippets ran" in run_child(CHILD_LOAD, {**env, "HF_HUB_OFFLINE": "1"}, tmp_path, spec)
    assert len(hub.requests) == requests_before


# ------------------------------------------------------------------------------------------ remote code
# The start of a child script for a process where hfx cannot be imported (as on a machine without it).
BLOCK_HFX = r"""
import importlib.abc, json, sys

class BlockHfx(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hfx" or name.startswith("hfx."):
            raise ImportError(f"importing {name} is blocked in this process")

sys.meta_path.insert(0, BlockHfx())
"""

CHILD_NO_HFX = BLOCK_HFX + r"""
try:
    import hfx  # noqa: F401
    raise SystemExit("the import hook did not block hfx")
except ImportError:
    pass

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from transformers import AutoModel

torch.set_num_threads(1)  # as in the parent: the same reduction order, bit-identical outputs
spec = json.loads(sys.argv[1])
expected = load_file(spec["expected"])
with torch.no_grad():
    for source in (spec["model_dir"], spec["model_repo"]):
        model = AutoModel.from_pretrained(source, trust_remote_code=True)
        assert torch.equal(model.decode(expected["z"]), expected["vae"]), source
    for source in (spec["pipeline_dir"], spec["pipeline_repo"]):
        pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe([0, 2], num_inference_steps=3, classifier_scale=1.0, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        assert torch.equal(torch.from_numpy(images), expected["pipeline"]), source
for snippet in spec["snippets"]:
    exec(snippet, {})
assert not [m for m in sys.modules if m == "hfx" or m.startswith("hfx.")]
print("remote code OK")
"""


@pytest.mark.slow
def test_remote_code_export_loads_where_hfx_cannot_be_imported(hub, tmp_path, caplog):
    z = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    run = make_vae_run(tmp_path)
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    tiny_pipeline(class_names=None).save_pretrained(tmp_path / "pipe-unnamed")
    with torch.no_grad():
        expected = {"z": z, "vae": tiny_vae(0).decode(z)}
    expected["pipeline"] = torch.from_numpy(pipe([0, 2], num_inference_steps=3, classifier_scale=1.0, output_type="np",
                                                 generator=torch.Generator().manual_seed(0)).images)
    save_file(expected, str(tmp_path / "expected.safetensors"))

    model_dir = export_remote_code(run)
    pipeline_dir = export_remote_code(tmp_path / "pipe", tmp_path / "pipe-export")
    # class_names is stored as a mapping, so no list-valued setting trips diffusers' Hub loader.
    assert "trust_remote_code=True) fail" not in caplog.text
    assert model_dir == run / "remote-code"
    assert {"configuration_vae.py", "modeling_vae.py"} <= {p.name for p in model_dir.iterdir()}
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_class_conditional", "ClassConditionalPipeline"]
    assert index["classifier"] == ["modeling_noisy_classifier", "NoisyClassifier"]
    assert not re.search(r"^\s*(from|import) hfx", (pipeline_dir / "pipeline_class_conditional.py").read_text(), re.M)
    with pytest.raises(FileExistsError, match="already exists"):
        export_remote_code(run)

    model_repo, pipeline_repo = hub.new_repo_id("vae-rc"), hub.new_repo_id("pipe-rc")
    named_repo = hub.new_repo_id("pipe-named-rc")
    push(run, model_repo, remote_code=True)
    push(tmp_path / "pipe-unnamed", pipeline_repo, remote_code=True)
    push(tmp_path / "pipe", named_repo, remote_code=True)
    assert "modeling_vae.py" in uploaded(hub, model_repo)
    assert {"pipeline_class_conditional.py", "classifier/modeling_noisy_classifier.py"} <= uploaded(hub, pipeline_repo)
    snippets = [snippet_of(hub.files(repo)["README.md"].decode()) for repo in (model_repo, pipeline_repo, named_repo)]
    assert all("trust_remote_code=True" in s and "import hfx" not in s for s in snippets)
    assert not any("snapshot_download" in snippet for snippet in snippets)

    spec = json.dumps({"expected": str(tmp_path / "expected.safetensors"), "model_dir": str(model_dir),
                       "model_repo": model_repo, "pipeline_dir": str(pipeline_dir), "pipeline_repo": pipeline_repo,
                       "snippets": snippets})
    env = {**hub_environment(hub.url), "HF_HOME": str(tmp_path / "child-hf-home")}
    assert "remote code OK" in run_child(CHILD_NO_HFX, env, tmp_path, spec)


def test_export_refuses_adapters_and_names_the_problem(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="PEFT adapter"):
        export_remote_code(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        export_remote_code(tmp_path)
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "config.json").write_text(json.dumps({"architecture": "vit_tiny", "pretrained_cfg": {}}))
    with pytest.raises(ValueError, match="no model_type: not a transformers model"):
        export_remote_code(tmp_path / "timm", tmp_path / "timm-export")
    assert not (tmp_path / "timm-export").exists() and not (tmp_path / "timm-export.tmp").exists()


# ------------------------------------------------------------------------------------------ cards
def test_card_metadata_results_images_and_snippet(tmp_path):
    run = make_vae_run(tmp_path)
    readme = render_card(run, hardware="2-core x86_64 CPU", eval_extractor="pixel likelihood (no extractor)",
                         command="hfx train vae-digits")
    assert readme == run / "final" / "README.md"
    card = ModelCard.load(readme)
    data = card.data
    assert data.library_name == "hfx" and data.license == "apache-2.0"
    assert {"hfx", "vae", "hfx_vae"} <= set(data.tags)
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"neg_elbo", "kl"}
    assert results["neg_elbo"].metric_value == 3.25 and results["neg_elbo"].dataset_name == "digits"
    assert results["neg_elbo"].dataset_split == "test"
    assert results["neg_elbo"].metric_args == {"num_samples": 64, "extractor": "pixel likelihood (no extractor)"}
    text = readme.read_text()
    for expected in ("2-core x86_64 CPU", "hfx train vae-digits", "Training time: 90 s", "max_eval_samples: 64",
                     "transformers 5.", "| neg_elbo | 3.25 | 64 |", "Limitations"):
        assert expected in text, expected
    images = card_images(text)
    assert images == ["images/reconstructions-step-0000010.png", "images/samples-step-0000010.png", "images/loss.png"]
    assert all((run / "final" / image).is_file() for image in images)

    namespace: dict = {}
    exec(snippet_of(text), namespace)  # the snippet loads this artifact from its folder and samples
    assert namespace["images"].shape == (4, 1, 8, 8)
    reference = tiny_vae(0)
    assert all(torch.equal(a, b) for a, b in zip(namespace["model"].state_dict().values(),
                                                  reference.state_dict().values()))

    # Re-rendering keeps the facts given before (hfx card needs none of them again).
    assert "2-core x86_64 CPU" in render_card(run).read_text()
    with pytest.raises(ValueError, match="unknown card facts.*hardwar"):
        render_card(run, hardwar="typo")


def test_pipeline_card_samples_a_grid_and_loads(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    readme = render_card(tmp_path / "pipe")
    card = ModelCard.load(readme)
    assert card.data.library_name == "hfx" and "ClassConditionalPipeline" in card.data.tags
    assert card.data.eval_results is None and "No evaluation was run" in card.text
    assert (tmp_path / "pipe" / "images" / "samples.png").is_file()
    namespace: dict = {}
    exec(snippet_of(readme.read_text()), namespace)
    assert len(namespace["images"]) == NUM_CLASSES


# ------------------------------------------------------------------------------------------ failures
def test_push_errors_are_clear_and_never_show_the_token(hub, tmp_path, monkeypatch, caplog, capsys):
    from huggingface_hub import constants

    caplog.set_level(logging.DEBUG)
    run = make_vae_run(tmp_path)
    bad_token = "hf_BadTokenThatMustNeverBeShown12345"
    repo_id = hub.new_repo_id()

    with pytest.raises(HubAuthError, match="rejected the token") as bad:
        push(run, repo_id, token=bad_token)
    with monkeypatch.context() as no_token:
        no_token.delenv("HF_TOKEN")
        no_token.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        with pytest.raises(HubAuthError, match="needs a token .* none was found"):
            push(run, repo_id)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push(tmp_path / "missing", repo_id)
    with pytest.raises(ValueError, match="invalid repo id"):
        push(run, "not a repo id")
    assert repo_id not in hub.repos  # nothing was created or committed

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"

    with monkeypatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(HubUnreachableError, match="offline mode is on"):
            push(run, repo_id)
    assert not constants.HF_HUB_OFFLINE  # below: unreachable for real, not refused by offline mode
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(HubUnreachableError, match=f"cannot reach the Hub at {closed}.*ConnectError") as unreachable:
        push(run, repo_id, token=bad_token, max_retries=1)
    monkeypatch.setenv("HF_ENDPOINT", closed)
    before = capsys.readouterr()
    assert main(["push", str(run), "--repo-id", repo_id]) == 1
    after = capsys.readouterr()
    assert after.err.splitlines()[-1].startswith(f"hfx push: error: cannot reach the Hub at {closed}")

    for text in (str(bad.value), str(unreachable.value), caplog.text, before.out, before.err, after.out, after.err,
                 (run / "final" / "README.md").read_text()):
        assert bad_token not in text and VALID_TOKEN not in text


def test_transient_failures_are_retried_and_commit_once(hub, tmp_path):
    run = make_vae_run(tmp_path)
    repo_id = hub.new_repo_id()
    hub.fail_next("POST", "/api/repos/create", [503])
    hub.fail_next("POST", "/commit/main", [502, 0, -1])  # 5xx, dropped connection, then a lost answer
    url = push(run, repo_id)
    assert hub.commit_count(repo_id) == 2  # the repo's initial commit + ours, once
    assert url == f"{hub.url}/{repo_id}/commit/{hub.repos[repo_id].branches['main']}"
    assert "model.safetensors" in hub.files(repo_id)

    hub.fail_next("POST", "/commit/main", [503] * 3)
    with pytest.raises(HubUnreachableError, match="kept failing.*nothing was committed"):
        push(run, repo_id, max_retries=2)
    assert hub.commit_count(repo_id) == 2


def test_failed_upload_leaves_no_partial_commit(hub, tmp_path):
    run = make_vae_run(tmp_path)
    repo_id = hub.new_repo_id()
    push(run, repo_id)
    before = hub.files(repo_id)
    tiny_vae(seed=1).save_pretrained(run / "final")  # new weights to upload
    hub.fail_next("PUT", "/_lfs/", [400])  # the LFS store refuses the weights
    with pytest.raises(ValueError, match="could not commit"):
        push(run, repo_id)
    assert hub.files(repo_id) == before and hub.commit_count(repo_id) == 2


def test_checkpoints_only_when_asked_and_cli_commands(hub, tmp_path, capsys):
    run = make_vae_run(tmp_path)
    repo_id = hub.new_repo_id()
    assert main(["card", str(run), "--hardware", "test machine"]) == 0
    assert "test machine" in (run / "final" / "README.md").read_text()
    assert capsys.readouterr().out.startswith("wrote ")
    assert main(["push", str(run), "--repo-id", repo_id, "--include-checkpoints", "--commit-message", "with state",
                 "--private"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{hub.url}/{repo_id}/commit/")
    assert hub.repos[repo_id].private
    with pytest.raises(Exception, match="Repository Not Found"):  # a private repo is invisible without a token
        hf_hub_download(repo_id, "config.json", token=False)
    files = uploaded(hub, repo_id)
    assert {"checkpoint-10/optimizer.bin", "checkpoint-10/random_states_0.pkl"} <= files
    assert not [f for f in files if f.startswith("logs/")]
    assert main(["export", str(run), "--remote-code", "--out", str(tmp_path / "rc")]) == 0
    assert (tmp_path / "rc" / "modeling_vae.py").is_file()
    assert main(["export", str(run), "--remote-code", "--out", str(tmp_path / "rc")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_a_training_run_writes_its_card_and_pushes_through_the_callback(hub, tmp_path):
    from hfx.trainers import load_config
    from hfx.trainers.engine import train

    repo_id = hub.new_repo_id("trained")
    config = load_config({
        "task": "vae", "output_dir": str(tmp_path / "run"),
        "data": {"dataset": "digits", "options": {"image_size": 8}, "max_eval_samples": 32},
        "task_options": {"model": {"block_out_channels": [8, 16], "latent_channels": 2, "norm_num_groups": 4},
                         "grid_size": 2, "scaling_samples": 32},
        "train": {"max_steps": 4, "batch_size": 16}, "eval": {"every_steps": 2},
        "log": {"every_steps": 1, "report_to": []},
    }, [])
    callback = HubCallback(push_to_hub=repo_id, command="hfx train vae-digits.yaml", hardware="test CPU")
    result = train(config, callbacks=[callback])
    card = ModelCard.load(result.final_dir / "README.md")
    measured = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert measured == pytest.approx({k: round(v, 6) for k, v in result.metrics.items()})
    assert all(r.metric_args == {"num_samples": 32} for r in card.data.eval_results)
    assert "hfx train vae-digits.yaml" in card.text and "test CPU" in card.text
    assert callback.commit_url.endswith(hub.repos[repo_id].branches["main"])
    files = uploaded(hub, repo_id)
    assert {"README.md", "model.safetensors", "images/loss.png"} <= files
    assert set(card_images(card.content)) <= files
    assert f'AutoModel.from_pretrained("{repo_id}")' in hub.files(repo_id)["README.md"].decode()


def test_hfx_train_with_push_to_hub_in_the_recipe_pushes_the_run(hub, tmp_path):
    """`push_to_hub: user/name` in a recipe: `hfx train` writes the card and pushes at the end."""
    import yaml

    repo_id = hub.new_repo_id("from-recipe")
    recipe = tmp_path / "vae.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "vae", "output_dir": str(tmp_path / "run"), "push_to_hub": repo_id,
        "data": {"dataset": "digits", "options": {"image_size": 8}, "max_eval_samples": 16},
        "task_options": {"model": {"block_out_channels": [8, 16], "latent_channels": 2, "norm_num_groups": 4},
                         "grid_size": 2, "scaling_samples": 16},
        "train": {"max_steps": 2, "batch_size": 16}, "log": {"report_to": []},
    }))
    assert main(["train", str(recipe)]) == 0
    files = uploaded(hub, repo_id)
    assert {"README.md", "config.json", "model.safetensors"} <= files
    assert not [f for f in files if f.startswith(("checkpoint-", "logs/"))]
    card = hub.files(repo_id)["README.md"].decode()
    assert f'AutoModel.from_pretrained("{repo_id}")' in card and "hfx train" in card
