"""ReLoRA pretraining experiment: full-rank vs LoRA vs ReLoRA, with and without a full-rank warm start.

The same small Llama (built from a ``LlamaConfig``, untied embeddings) is pretrained from scratch on the CPython
standard library (``hfx.data.builtin_dataset("stdlib-text")``, tokenised like the ``causal-lm`` task: a
byte-level BPE trained on the train split, documents joined with end-of-text and cut into blocks) by these
variants, at equal optimizer steps and tokens, with the same data order for a given seed:

- ``full``: every parameter trains; AdamW at ``--lr-full``, linear warm-up then cosine.
- ``full_same_lr``: the same at ``--lr-lora``, the peak LR of the low-rank variants.
- ``lora``: peft ``LoraConfig`` of rank ``--rank`` on every attention and MLP linear; embeddings, norms and the
  LM head train fully (``modules_to_save``), as in the paper's LoRA baseline; same warm-up + cosine.
- ``lora_warm``: the control for ``relora_warm``: the same full-rank warm start and switch, then plain LoRA (no
  restarts), so the two differ only by ReLoRA's restarts.
- ``relora``: :class:`hfx.peft.ReLoraConfig` with the same rank and ``modules_to_save``, merged and restarted
  every ``--relora-steps`` (:func:`hfx.peft.relora_restart`, magnitude pruning of the LoRA optimizer state) on
  the jagged cosine schedule (:func:`hfx.peft.jagged_cosine_multiplier`).
- ``relora_warm``: the first ``--warm-steps`` steps full-rank, then ReLoRA (restarts at ``warm + k *
  relora_steps``; the schedule's restart ramp follows the switch). The ReLoRA phase starts a new AdamW (the
  full-rank moments of the wrapped linears belong to weights that no longer train directly).

The defaults are the setting of the main table in ``bench/RESULTS.md``: rank 2, and each method at its best peak
LR from a seed-0 sweep (full-rank 2e-3; LoRA and ReLoRA 8e-3), 2,000 steps, a restart every 500 and a 1,000-step
warm start. ``--alpha`` and ``--prune-method`` change the adapters' scale and the optimizer pruning.

Each (variant, seed) runs in its own subprocess (one torch thread), so its peak resident memory
(``ru_maxrss``) is its own; results are appended to ``<out>/results.jsonl`` and a finished run is skipped when
the script is run again, so a crash loses only the run in progress.

    OMP_NUM_THREADS=1 nohup .venv/bin/python bench/relora_pretraining.py > outputs/relora_pretraining.log 2>&1 &
    .venv/bin/python bench/relora_pretraining.py --report      # the table from results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from hfx.peft.relora.config import PRUNE_METHODS

VARIANTS = ("full", "full_same_lr", "lora", "lora_warm", "relora", "relora_warm")
MODULES_TO_SAVE = ["embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/relora_pretraining", help="folder for data cache, results, logs")
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "full_same_lr"], choices=VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--relora-steps", type=int, default=500)
    p.add_argument("--warm-steps", type=int, default=1000, help="full-rank steps of relora_warm and lora_warm")
    p.add_argument("--restart-warmup", type=int, default=50)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--lr-full", type=float, default=2e-3, help="peak LR of full (the best of 1e-3 ... 8e-3 here)")
    p.add_argument("--lr-lora", type=float, default=8e-3,
                   help="peak LR of LoRA and ReLoRA (and warm start's ReLoRA phase); the best of 2e-3 ... 1.6e-2 here")
    p.add_argument("--prune-ratio", type=float, default=0.9)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: the rank, a scale of 1)")
    p.add_argument("--prune-method", default="magnitude", choices=PRUNE_METHODS)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=352)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--eval-blocks", type=int, default=256, help="held-out blocks scored (from the test split)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--report", action="store_true", help="print the table from results.jsonl and exit")
    p.add_argument("--run", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)  # one run, in-process
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- data
def prepare_data(args) -> Path:
    """Tokenise the corpus once (tokenizer trained on the train split) and cache the train / held-out blocks."""
    import torch

    out = Path(args.out)
    cache = out / f"blocks_v{args.vocab}_b{args.block}.pt"
    if cache.is_file():
        return cache
    from hfx.data import builtin_dataset
    from hfx.trainers.tasks.causal_lm import CausalLMTask, train_bpe_tokenizer

    data = builtin_dataset("stdlib-text")
    tokenizer = train_bpe_tokenizer(iter(data["train"]["text"]), args.vocab)
    # The causal-lm task's own blocking (join with end-of-text, cut into block_size tokens).
    task = SimpleNamespace(options=SimpleNamespace(block_size=args.block, text_column="text"), tokenizer=tokenizer)
    blocks = {split: torch.stack(list(CausalLMTask._blocks(task, data[split])["input_ids"])) for split in ("train", "test")}
    out.mkdir(parents=True, exist_ok=True)
    torch.save({**blocks, "vocab": len(tokenizer)}, cache.with_suffix(".tmp"))
    os.replace(cache.with_suffix(".tmp"), cache)
    return cache


# ------------------------------------------------------------------------------------------------- one run
def build_model(args, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                         max_position_embeddings=args.block, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def lora_fields(args) -> dict:
    return dict(r=args.rank, lora_alpha=args.alpha or args.rank, target_modules="all-linear", modules_to_save=list(MODULES_TO_SAVE))


def relora_config(args, warm: bool):
    from hfx.peft import ReLoraConfig

    return ReLoraConfig(**lora_fields(args), relora_steps=args.relora_steps, restart_warmup_steps=args.restart_warmup,
                        warmup_steps=args.warmup, min_lr_ratio=args.min_lr_ratio, prune_method=args.prune_method,
                        prune_ratio=args.prune_ratio, full_rank_warmup_steps=args.warm_steps if warm else 0)


def evaluate(model, blocks, batch: int) -> float:
    import torch

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            ids = blocks[i:i + batch]
            logits = model(input_ids=ids).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
            count += ids[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


def run_one(args, variant: str, seed: int) -> dict:
    import peft
    import torch
    from tqdm import tqdm

    import hfx  # noqa: F401  (registers ReLoRA with peft)
    from hfx.peft import is_restart_step, jagged_cosine_multiplier, relora_restart

    torch.set_num_threads(1)
    data = torch.load(prepare_data(args), weights_only=True)
    train, held_out = data["train"], data["test"][:args.eval_blocks]
    torch.manual_seed(seed)
    model = build_model(args, data["vocab"])
    total_params = sum(p.numel() for p in model.parameters())
    # The same data order for every variant of a seed: a permutation drawn from its own generator.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))
    needed = args.steps * args.batch
    order = order.repeat(needed // len(order) + 1)[:needed]

    warm = args.warm_steps if variant in ("relora_warm", "lora_warm") else 0
    relora = variant in ("relora", "relora_warm")
    cfg = relora_config(args, warm=bool(warm)) if relora else None
    offset = cfg.full_rank_warmup_steps if relora else 0

    def multiplier(step: int) -> float:
        if relora:
            return jagged_cosine_multiplier(step, num_training_steps=args.steps, warmup_steps=args.warmup,
                                            relora_steps=args.relora_steps, restart_warmup_steps=args.restart_warmup,
                                            min_lr_ratio=args.min_lr_ratio, first_restart_offset=offset)
        # warm-up + one cosine (the jagged schedule without restarts); after lora_warm's switch, the same ramp from 0
        # as relora_warm's
        return jagged_cosine_multiplier(step, num_training_steps=args.steps, warmup_steps=args.warmup,
                                        relora_steps=args.steps + 1, restart_warmup_steps=args.restart_warmup if warm else 0,
                                        min_lr_ratio=args.min_lr_ratio, first_restart_offset=warm)

    def wrap(base):
        peft_config = cfg if relora else peft.LoraConfig(**lora_fields(args))
        wrapped = peft.get_peft_model(base, peft_config)
        return wrapped, args.lr_lora

    def new_optimizer(m, lr):
        params = [p for p in m.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1), sum(p.numel() for p in params)

    if variant == "full" or warm:
        peak = args.lr_full
    elif variant == "full_same_lr":
        peak = args.lr_lora
    else:
        model, peak = wrap(model)
    optimizer, trainable = new_optimizer(model, peak)
    trainable_phases = [trainable]
    curve, step_times, restarts = [], [], []
    start = time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"{variant} seed {seed}", mininterval=30):
        if warm and step == warm:  # the switch: wrap the full-rank-trained base (ReLoRA or LoRA)
            model, peak = wrap(model)
            optimizer, trainable = new_optimizer(model, peak)
            trainable_phases.append(trainable)
        for group in optimizer.param_groups:
            group["lr"] = peak * multiplier(step)
        t0 = time.perf_counter()
        ids = train[order[step * args.batch:(step + 1) * args.batch]]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if relora and done >= offset and is_restart_step(done, relora_steps=args.relora_steps, first_restart_offset=offset) \
                and done < args.steps:
            stats = relora_restart(model, optimizer, step=done)
            restarts.append({"step": done, "pruned_fraction": round(stats.pruned_fraction, 4)})
        step_times.append(time.perf_counter() - t0)
        if done % args.eval_every == 0 or done == args.steps:
            curve.append({"step": done, "train_loss": round(loss.item(), 4), "ppl": round(evaluate(model, held_out, 32), 3)})
    return {
        "variant": variant, "seed": seed, "held_out_ppl": curve[-1]["ppl"], "curve": curve, "restarts": restarts,
        "total_params": total_params, "trainable_params": trainable_phases,
        "median_step_s": round(statistics.median(step_times), 4), "mean_step_s": round(statistics.fmean(step_times), 4),
        "wall_s": round(time.perf_counter() - start, 1),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tokens": args.steps * args.batch * args.block,
    }


# ------------------------------------------------------------------------------------------------- driver
def settings(args) -> dict:
    keys = ("steps", "relora_steps", "warm_steps", "restart_warmup", "warmup", "min_lr_ratio", "lr_full", "lr_lora",
            "prune_ratio", "rank", "alpha", "prune_method", "hidden", "layers", "intermediate", "vocab", "block", "batch", "eval_blocks")
    return {k: getattr(args, k) for k in keys}


def load_results(path: Path, args) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("settings") == settings(args)]


def training_state_mb(row: dict) -> float:
    """float32 weights of the whole model plus gradient and two AdamW moments of what trains, at the phase that
    trains the most (the full-rank warm start for ``relora_warm``): the memory the variant needs for training,
    apart from activations and the Python process."""
    return 4 * (row["total_params"] + 3 * max(row["trainable_params"])) / 2**20


def report(rows: list[dict]) -> str:
    lines = ["| variant | held-out ppl (seed 0 / 1) | mean | spread (max-min) | trainable params | training state MB | "
             "peak RSS MB | median s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        runs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        if not runs:
            continue
        ppl = [r["held_out_ppl"] for r in runs]
        trainable = " -> ".join(f"{n:,}" for n in runs[0]["trainable_params"])
        lines.append(f"| {variant} | {' / '.join(f'{p:.2f}' for p in ppl)} | {statistics.fmean(ppl):.2f} | "
                     f"{max(ppl) - min(ppl):.2f} | {trainable} | {training_state_mb(runs[0]):.1f} | "
                     f"{max(r['max_rss_mb'] for r in runs):.0f} | {statistics.median(r['median_step_s'] for r in runs):.3f} |")
    means = {v: statistics.fmean(r["held_out_ppl"] for r in rows if r["variant"] == v)
             for v in VARIANTS if any(r["variant"] == v for r in rows)}
    lines.append("")
    for full in ("full", "full_same_lr"):
        if not {full, "lora"} <= means.keys():
            continue
        gap = means["lora"] - means[full]
        if gap <= 0:
            lines.append(f"LoRA ({means['lora']:.2f}) is not worse than {full} ({means[full]:.2f}): no gap to close")
            continue
        for v in ("relora", "lora_warm", "relora_warm"):
            if v in means:
                lines.append(f"{v}: closes {100 * (means['lora'] - means[v]) / gap:.0f} % of the LoRA-to-{full} "
                             f"perplexity gap ({means['lora']:.2f} -> {means[full]:.2f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if args.run:
        variant, seed = args.run[0], int(args.run[1])
        row = run_one(args, variant, seed)
        row.update(settings=settings(args), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   machine=f"{platform.machine()} {os.cpu_count()}-core CPU, 1 torch thread")
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return 0
    if args.report:
        print(report(load_results(results, args)))
        return 0
    prepare_data(args)
    done = {(r["variant"], r["seed"]) for r in load_results(results, args)}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # Seeds outer, variants inner: a partial experiment still compares the variants on the same seed.
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed) in done:
                print(f"skip {variant} seed {seed} (in {results})", flush=True)
                continue
            print(f"run {variant} seed {seed}", flush=True)
            subprocess.run([sys.executable, __file__, *passthrough, "--run", variant, str(seed)], env=env, check=True)
    print(report(load_results(results, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
