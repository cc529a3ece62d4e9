"""hfx_lm through ``hfx train``: every option trains and reloads in a fresh process, Transformer-XL memory
rides on batchified streams and survives SIGKILL exactly, PEFT methods reload with cached generate, bad
options end in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfx.cli import main
from hfx.trainers import Trainer, load_config

TINY = ("task_options.model=hfx_lm", "task_options.vocab_size=300", "task_options.block_size=32",
        "data.options={max_files: 30}", "data.max_eval_samples=40", "train.batch_size=8", "scheduler.warmup_steps=2",
        "checkpoint.every_steps=null", "log.report_to=[]", "log.every_steps=5", "optimizer.lr=3e-3")
SIZES = "hidden_size: 32, intermediate_size: 48, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2"

VARIANTS = {
    "llama-like": "",
    "alibi": "position: alibi",
    "relative": "position: relative",
    "sinusoidal-postnorm-gelu": "position: sinusoidal, norm: layernorm, norm_position: post, mlp: gelu",
    "learned": "position: learned",
    "none": "position: none",
    "moe": "num_experts: 4, num_experts_per_tok: 2, router_z_loss_coef: 0.001",
    "xl-memory": "mem_len: 32",
}


def lm(out: Path, *overrides: str, options: str = "", steps: int = 24):
    opts = SIZES + (", " + options if options else "")
    return load_config("lm-stdlib", [*TINY, f"output_dir={out}", f"task_options.model_options={{{opts}}}",
                                     f"train.max_steps={steps}", "eval.every_steps=null", *overrides])


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line) and "perplexity" not in json.loads(line)]


PROBE = [[5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 2, 31]]

CHILD = r"""
import sys, torch, hfx
from transformers import AutoModelForCausalLM
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = torch.load(folder + "/expected_logits.pt", weights_only=True)
    ids = torch.tensor(PROBE)
    with torch.no_grad():  # as the expected logits were computed (SDPA picks its CPU kernel by grad mode)
        got = model(ids).logits
    assert torch.equal(got, expected), (folder, (got - expected).abs().max())
    print("same", type(model).__name__, model.config.position)
""".replace("PROBE", repr(PROBE))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm")
    outs, tokenizer = {}, None
    for name, options in VARIANTS.items():
        out = root / name
        extra = [f"task_options.tokenizer={tokenizer}"] if tokenizer else []
        trainer = Trainer(lm(out, *extra, options=options))
        trainer.fit()
        tokenizer = tokenizer or out / "tokenizer"
        with torch.no_grad():
            logits = trainer.unwrapped("model").eval()(torch.tensor(PROBE)).logits
        torch.save(logits, out / "final" / "expected_logits.pt")
        outs[name] = out
    return outs


def test_every_option_trains_and_reloads_in_a_fresh_process_with_equal_logits(trained):
    for name, out in trained.items():
        curve = losses(out)
        assert curve[-1] < curve[0] - 0.3, (name, curve)
    folders = [str(out / "final") for out in trained.values()]
    done = subprocess.run([sys.executable, "-c", CHILD, *folders], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-600:]
    assert done.stdout.count("same HfxLMForCausalLM") == len(trained)
    config = json.loads((trained["xl-memory"] / "final" / "config.json").read_text())
    assert config["model_type"] == "hfx_lm" and config["mem_len"] == 32 and config["segment_len"] == 32


def test_the_saved_model_serves_the_text_generation_pipeline(trained):
    import transformers

    generator = transformers.pipeline("text-generation", model=str(trained["xl-memory"] / "final"))
    text = generator("def main(", max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert text.startswith("def main(") and len(text) > len("def main(")
    from test_hub import snippet_of

    card = (trained["xl-memory"] / "final" / "README.md").read_text()
    assert "Transformer-XL memory of 32 tokens" in card
    exec(snippet_of(card), {})  # the card's load-and-generate snippet runs as written


def test_xl_streams_each_row_continues_its_stream(tmp_path):
    trainer = Trainer(lm(tmp_path, options="mem_len: 32", steps=1))
    trainer.fit()
    task = trainer.task
    rows = 8
    data = task.build_data().train.rows
    # item k * rows + r is segment k of stream r: consecutive segments of a row are consecutive text
    stream0 = torch.cat([data[k * rows] for k in range(3)])
    joined = task.tokenizer.decode(stream0)
    assert task.tokenizer.decode(data[0]) + task.tokenizer.decode(data[rows]) in joined
    assert not trainer.train_loader.batch_sampler.sampler.__class__.__name__.endswith("RandomSampler")


def _sigkilled_then_resumed(tmp_path: Path, options: str, steps: int) -> tuple[Path, Path]:
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = [*TINY, f"task_options.model_options={{{SIZES}, {options}}}", f"train.max_steps={steps}",
              "checkpoint.every_steps=10", "eval.every_steps=30"]
    assert main(["train", "lm-stdlib", f"output_dir={full}", *common]) == 0
    command = [sys.executable, "-m", "hfx", "train", "lm-stdlib", f"output_dir={killed}",
               f"task_options.tokenizer={full / 'tokenizer'}", *common]
    proc = subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoint-20" / "trainer_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run ended before it could be killed"
    assert main(["train", "lm-stdlib", f"output_dir={killed}", f"task_options.tokenizer={full / 'tokenizer'}",
                 *common, "resume_from_checkpoint=latest"]) == 0
    return full, killed


def test_a_sigkilled_xl_memory_run_resumes_bit_identically(tmp_path):
    full, killed = _sigkilled_then_resumed(tmp_path, "mem_len: 32, position: relative", steps=150)
    a, b = load_file(full / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def evals(out):
        return [{k: v for k, v in json.loads(line).items() if k in ("step", "perplexity", "loss")}
                for line in (out / "metrics.jsonl").read_text().splitlines() if "perplexity" in line]
    assert evals(full) == evals(killed) and len(evals(full)) >= 5
    memory = torch.load(next((killed).glob("checkpoint-*/task_state_0.pt")), weights_only=True)["memory"]
    assert memory["memory"][0].shape == (8, 32, 32)  # rows x mem_len x hidden, per layer


@pytest.mark.parametrize("method", ["lora", "relora", "ia3", "prefix_tuning", "prompt_tuning", "bottleneck_adapter"])
def test_peft_methods_train_and_reload_with_cached_generate(tmp_path, method):
    import peft
    from transformers import AutoModelForCausalLM

    extra = {"prefix_tuning": ", num_virtual_tokens: 4", "prompt_tuning": ", num_virtual_tokens: 4",
             "relora": ", r: 4, relora_steps: 8, restart_warmup_steps: 2", "lora": ", r: 4"}.get(method, "")
    schedule = ["scheduler={name: relora_jagged}"] if method == "relora" else []
    trainer = Trainer(lm(tmp_path, f"peft={{method: {method}{extra}}}", *schedule, steps=16))
    trainer.fit()
    trained = trainer.unwrapped("model").eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "base")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "final").eval()
    ids = torch.tensor(PROBE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=1e-6)
    greedy = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = loaded.generate(input_ids=ids, **greedy)
    assert torch.equal(cached, loaded.generate(input_ids=ids, use_cache=False, **greedy))


@pytest.mark.parametrize("override, named", [
    ("task_options.model_options={position: rotary}", "task_options.model_options: position='rotary' is not one of"),
    ("task_options.model_options={mem_len: 16, position: learned}", "mem_len=16 needs a position encoding with a relative"),
    ("task_options.model_options={position: learned, max_position_embeddings: 16}",
     "max_position_embeddings=16 rows, fewer than task_options.block_size=32"),
    ("task_options.model_options={mem_len: 16, segment_len: 8}", "segment_len=8 must equal task_options.block_size=32"),
    ("task_options.model_options={num_key_value_heads: 3}", "num_key_value_heads=3 must divide num_attention_heads"),
    ("task_options.model_options={hidden_size: big}", "hidden_size must be an integer, got 'big'"),
    ("task_options.model=hfx_llm", "task_options.model 'hfx_llm' is not a transformers model type"),
])
def test_bad_model_options_end_in_one_line_naming_the_field(tmp_path, capsys, override, named):
    code = main(["train", "lm-stdlib", f"output_dir={tmp_path}", *TINY, "train.max_steps=1", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and named in err[-1] and "Traceback" not in "\n".join(err), err[-3:]


def test_memory_with_prefix_tuning_is_refused(tmp_path, capsys):
    code = main(["train", "lm-stdlib", f"output_dir={tmp_path}", *TINY, "train.max_steps=1",
                 "task_options.model_options={mem_len: 16}", "peft={method: prefix_tuning, num_virtual_tokens: 2}"])
    assert code == 1 and "cannot hold" in capsys.readouterr().err


def test_the_remote_code_export_loads_and_decodes_where_hfx_cannot_be_imported(trained, tmp_path):
    from test_hub import BLOCK_HFX

    from hfx.hub.export import export_remote_code

    out = export_remote_code(trained["moe"] / "final", tmp_path / "exported")
    child = BLOCK_HFX + r"""
import torch
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
expected = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    assert torch.equal(model(torch.tensor(PROBE)).logits, expected)
ids = torch.tensor(PROBE)
greedy = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
assert torch.equal(model.generate(ids, **greedy), model.generate(ids, use_cache=False, **greedy))
assert not [m for m in sys.modules if m == "hfx" or m.startswith("hfx.")]
print("remote code OK", type(model).__module__)
""".replace("PROBE", repr(PROBE))
    done = subprocess.run([sys.executable, "-c", child, str(out), str(trained["moe"] / "final" / "expected_logits.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-800:]
    assert "remote code OK transformers_modules" in done.stdout


def test_a_pretrained_models_config_fields_can_be_overridden(trained, tmp_path):
    folder = trained["xl-memory"] / "final"
    config = load_config("lm-stdlib", [*TINY, f"output_dir={tmp_path}", f"task_options.model={folder}",
                                       "task_options.pretrained=true", f"task_options.tokenizer={folder}",
                                       "task_options.model_options={mem_len: 0}", "train.max_steps=2",
                                       "eval.every_steps=null"])
    trainer = Trainer(config)
    trainer.fit()
    assert trainer.task.memory_on is False and trainer.unwrapped("model").config.mem_len == 0
    assert trainer.task.stream is False  # blocks again, shuffled
