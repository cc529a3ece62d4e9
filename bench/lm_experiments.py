"""hfx_lm experiments: length extrapolation per position encoding, Mixture of Experts, Transformer-XL memory,
GQA's KV cache, and hfx_lm-as-Llama against transformers' Llama.

Every trained variant is the ``lm-stdlib`` recipe with ``model: hfx_lm`` (4 layers, width 128, 4 heads, MLP 384,
128-token blocks, batch 16, AdamW 1e-3 cosine) on the CPython standard library's source, with ONE tokenizer for
all runs (the first run's byte-level BPE, 4,096 tokens) and, for a given seed, the same data order, steps and
tokens. Held-out text is the recipe's ``test`` split (files hashed out of training), tokenised into one stream.

Parts (``--part``):

- ``extrapolation``: trained at 128 tokens, perplexity on non-overlapping held-out windows of 128 / 256 / 512 /
  1024 tokens (every prediction inside a window scored; the same 16k tokens at every length), for each ``position``.
  ``learned`` gets a 1,024-row table of which training reaches only the first 128 rows (with 128 rows it refuses
  longer inputs: that is the other possible answer).
- ``moe``: 8 experts top-2 (expert MLP 192, so 384 active MLP units like the dense base) with the load-balancing
  loss (0.01) and without it (0), against dense MLPs of 384 (equal active parameters) and 1,536 (equal total).
  Routing: the share of the held-out tokens' top-2 assignments each expert gets, per layer (a plot).
- ``xl``: Transformer-XL memory of 128 tokens vs none, both trained on the same batchified streams with
  128-token segments (rope). Held-out perplexity over the stream scored at the same positions (tokens 1..127 of
  each segment); evaluation cost per token: XL (segments of 128 with memory) vs a sliding-window model that
  recomputes the same 256-token context for every token, in one run.
- ``gqa``: 8 query heads with 8 / 2 / 1 key-value heads (width 256, 4 layers): KV-cache bytes after a 16-token
  prompt and 256 new tokens (batch 8), and cached decode tokens/s.
- ``speed``: hfx_lm built from a ``LlamaForCausalLM`` (same weights) vs that Llama at lm-stdlib's size: forward +
  backward step time (batch 16 x 128) and cached greedy decode tokens/s (batch 8, 128 new tokens), interleaved,
  median of rounds. Run it alone on the machine.

Results are appended to ``<out>/results.jsonl`` (a finished (part, variant, seed) is skipped when the script runs
again); ``--report`` prints the tables for bench/RESULTS.md.

    OMP_NUM_THREADS=1 nohup .venv/bin/python bench/lm_experiments.py --part extrapolation moe xl gqa > outputs/lm.log 2>&1 &
    OMP_NUM_THREADS=1 .venv/bin/python bench/lm_experiments.py --part speed      # alone
    .venv/bin/python bench/lm_experiments.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

SIZES = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "tie_word_embeddings": True}
POSITIONS = ["rope", "alibi", "relative", "sinusoidal", "learned", "none"]
LENGTHS = [128, 256, 512, 1024]
EVAL_TOKENS = 16 * 1024
MOE = {
    "dense-384 (equal active)": {},
    "dense-1536 (equal total)": {"intermediate_size": 1536},
    "moe-8x192-top2 aux 0.01": {"intermediate_size": 192, "num_experts": 8, "num_experts_per_tok": 2,
                                "router_aux_loss_coef": 0.01},
    "moe-8x192-top2 aux 0.1": {"intermediate_size": 192, "num_experts": 8, "num_experts_per_tok": 2,
                               "router_aux_loss_coef": 0.1},
    "moe-8x192-top2 no aux": {"intermediate_size": 192, "num_experts": 8, "num_experts_per_tok": 2,
                              "router_aux_loss_coef": 0.0},
}
XL = {"no memory": {"mem_len": 0}, "memory 128": {"mem_len": 128}}


def done(out: Path) -> set[tuple]:
    path = out / "results.jsonl"
    if not path.exists():
        return set()
    return {(r["part"], r["variant"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def record(out: Path, row: dict) -> None:
    with open(out / "results.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def train(out: Path, name: str, seed: int, options: dict, steps: int, *extra: str):
    """One lm-stdlib run of hfx_lm with ``options`` over SIZES; returns (trainer, seconds)."""
    from hfx.trainers import Trainer, load_config

    tokenizer = out / "tokenizer-run" / "tokenizer"
    run = out / "runs" / f"{name}-seed{seed}".replace(" ", "_").replace("(", "").replace(")", "")
    overrides = [f"output_dir={run}", "task_options.model=hfx_lm", f"seed={seed}", f"train.max_steps={steps}",
                 f"task_options.model_options={json.dumps({**SIZES, **options})}", "eval.every_steps=null",
                 "eval.at_end=false", "checkpoint.every_steps=null", "log.report_to=[]", "log.every_steps=50",
                 "data.eval_split=null", *extra]
    if tokenizer.exists():
        overrides.append(f"task_options.tokenizer={tokenizer}")
    else:
        overrides[0] = f"output_dir={tokenizer.parent}"
    trainer = Trainer(load_config("lm-stdlib", overrides))
    start = time.perf_counter()
    trainer.fit()
    return trainer, time.perf_counter() - start


def held_out_ids(trainer) -> torch.Tensor:
    """The test split as one token stream (documents joined by end-of-text), EVAL_TOKENS long."""
    import hfx.data

    data = hfx.data.load("stdlib-text", seed=0, max_files=200)["test"]
    tok, ids = trainer.task.tokenizer, []
    for text in data["text"]:
        ids.extend(tok(text)["input_ids"] + [tok.eos_token_id])
        if len(ids) >= EVAL_TOKENS + 1024:
            break
    if len(ids) < EVAL_TOKENS:
        raise SystemExit(f"held-out stream has {len(ids)} tokens, fewer than {EVAL_TOKENS}")
    return torch.tensor(ids[:EVAL_TOKENS])


@torch.no_grad()
def window_perplexity(model, stream: torch.Tensor, length: int, score_from: int = 0) -> float:
    """Mean next-token loss over non-overlapping windows of ``length`` (targets from position ``score_from + 1``)."""
    windows = stream[: len(stream) // length * length].view(-1, length)
    nll, count = 0.0, 0
    for batch in windows.split(max(1, 4096 // length)):
        logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, score_from:-1].flatten(0, 1), batch[:, score_from + 1:].flatten(),
                                                 reduction="sum")
        nll, count = nll + float(loss), count + batch[:, score_from + 1:].numel()
    return math.exp(nll / count)


def part_extrapolation(out, seeds, steps):
    for seed in seeds:
        for position in POSITIONS:
            if ("extrapolation", position, seed) in done(out):
                continue
            options = {"position": position, **({"max_position_embeddings": 1024} if position == "learned" else {})}
            trainer, seconds = train(out, f"pos-{position}", seed, options, steps)
            model = trainer.unwrapped("model").eval()
            stream = held_out_ids(trainer)
            ppl = {str(n): window_perplexity(model, stream, n) for n in LENGTHS}
            record(out, {"part": "extrapolation", "variant": position, "seed": seed, "perplexity": ppl,
                         "train_seconds": round(seconds, 1), "steps": steps})


@torch.no_grad()
def routing(model, stream) -> list[list[float]]:
    """Per layer, the share of top-k assignments that each expert receives on 4,096 held-out tokens, read as
    the model was trained: 128-token windows."""
    out = model(stream[:4096].view(-1, 128), output_router_logits=True)
    k = model.config.num_experts_per_tok
    shares = []
    for logits in out.router_logits:
        chosen = logits.float().softmax(-1).topk(k, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=model.config.num_experts).float()
        shares.append((counts / counts.sum()).tolist())
    return shares


def part_moe(out, seeds, steps):
    for seed in seeds:
        for name, options in MOE.items():
            if ("moe", name, seed) in done(out):
                continue
            trainer, seconds = train(out, f"moe-{name}", seed, options, steps)
            model = trainer.unwrapped("model").eval()
            stream = held_out_ids(trainer)
            params = sum(p.numel() for p in model.parameters())
            row = {"part": "moe", "variant": name, "seed": seed, "perplexity": window_perplexity(model, stream, 128),
                   "parameters": params, "train_seconds": round(seconds, 1), "steps": steps}
            if options.get("num_experts"):
                row["routing"] = routing(model, stream)
                with torch.no_grad():  # the balancing loss's own value: 2 (= top-k) when probabilities are flat
                    row["aux_loss_held_out"] = float(model(stream[:4096].view(-1, 128)).aux_loss)
            record(out, row)


@torch.no_grad()
def xl_perplexity(model, stream, segment=128) -> float:
    """The stream read segment by segment with the model's memory (none for mem_len 0), scoring tokens 1..127 of
    each segment (what a model without memory can also predict)."""
    cache, nll, count = None, 0.0, 0
    for chunk in stream[: len(stream) // segment * segment].view(-1, segment):
        out = model(chunk[None], past_key_values=cache, use_cache=model.config.mem_len > 0)
        cache = out.past_key_values if model.config.mem_len else None
        nll += float(torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), chunk[1:], reduction="sum"))
        count += segment - 1
    return math.exp(nll / count)


@torch.no_grad()
def eval_cost(xl_model, window_model, stream, context=256, tokens=512) -> dict:
    """Seconds per token: XL over ``len(stream)`` tokens in 128-token segments with memory; a sliding window that
    recomputes the last ``context`` tokens for each of ``tokens`` tokens (what a model without memory must do to
    give every token the same context)."""
    start = time.perf_counter()
    xl_model(stream[None])  # one pass: the model walks the stream segment by segment, carrying its memory
    xl = (time.perf_counter() - start) / len(stream)
    start = time.perf_counter()
    for t in range(context, context + tokens):
        window_model(stream[None, t - context:t])
    window = (time.perf_counter() - start) / tokens
    return {"xl_ms_per_token": xl * 1e3, "window_ms_per_token": window * 1e3, "ratio": window / xl}


def part_xl(out, seeds, steps):
    for seed in seeds:
        if {("xl", name, seed) for name in XL} | {("xl-cost", "ratio", seed)} <= done(out):
            continue
        models = {}
        for name, options in XL.items():
            trainer, seconds = train(out, f"xl-{name}", seed, options, steps, "task_options.stream=true")
            model = trainer.unwrapped("model").eval()
            models[name] = model
            stream = held_out_ids(trainer)
            if ("xl", name, seed) not in done(out):
                record(out, {"part": "xl", "variant": name, "seed": seed, "perplexity": xl_perplexity(model, stream),
                             "train_seconds": round(seconds, 1), "steps": steps})
        if len(models) == 2 and ("xl-cost", "ratio", seed) not in done(out):
            cost = eval_cost(models["memory 128"], models["no memory"], stream[:4096])
            record(out, {"part": "xl-cost", "variant": "ratio", "seed": seed, **cost})


def part_gqa(out):
    from hfx.models.lm import HfxLMConfig, HfxLMForCausalLM

    for kv in (8, 2, 1):
        if ("gqa", f"kv{kv}", 0) in done(out):
            continue
        torch.manual_seed(0)
        config = HfxLMConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=kv, max_position_embeddings=512)
        model = HfxLMForCausalLM(config).eval()
        prompt = torch.randint(0, 4096, (8, 16))
        greedy = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=256, min_new_tokens=256, do_sample=False,
                      pad_token_id=0, return_dict_in_generate=True)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            result = model.generate(prompt, **greedy)
            times.append(time.perf_counter() - start)
        cache = result.past_key_values
        kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        record(out, {"part": "gqa", "variant": f"kv{kv}", "seed": 0, "kv_cache_bytes": kv_bytes,
                     "decode_tokens_per_s": 8 * 256 / statistics.median(times)})


def part_speed(out, rounds=7):
    import transformers

    from hfx.models.lm import from_llama

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=4096, max_position_embeddings=128, **SIZES)).train()
    ours = from_llama(llama).train()
    batch = torch.randint(0, 4096, (16, 128))
    prompt = torch.randint(0, 4096, (8, 16))
    greedy = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=128, min_new_tokens=128, do_sample=False,
                  pad_token_id=0)

    def step(model):
        model.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()

    def decode(model):
        with torch.no_grad():
            model.generate(prompt, **greedy)

    rows = {}
    for name, fn, reps in (("step", step, 10), ("decode", decode, 2)):
        timings = {"hfx_lm": [], "llama": []}
        for model in (ours, llama):  # warm-up
            fn(model.eval() if name == "decode" else model.train())
        for _ in range(rounds):
            for label, model in (("hfx_lm", ours), ("llama", llama)):
                model.eval() if name == "decode" else model.train()
                start = time.perf_counter()
                for _ in range(reps):
                    fn(model)
                timings[label].append((time.perf_counter() - start) / reps)
        ratios = [a / b for a, b in zip(timings["hfx_lm"], timings["llama"], strict=True)]
        rows[name] = {"hfx_lm_s": statistics.median(timings["hfx_lm"]), "llama_s": statistics.median(timings["llama"]),
                      "ratio": statistics.median(ratios)}
    record(out, {"part": "speed", "variant": "hfx_lm vs llama", "seed": 0, "threads": torch.get_num_threads(), **rows})


def report(out: Path) -> None:
    if not (out / "results.jsonl").is_file():
        raise SystemExit(f"no results in {out}: run the parts first (see --help)")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]

    def by(part):
        groups = {}
        for r in rows:
            if r["part"] == part:
                groups.setdefault(r["variant"], []).append(r)
        return groups

    def pm(values):
        return f"{statistics.mean(values):.1f}" + (f" ± {abs(values[0] - values[1]) / 2:.1f}" if len(values) > 1 else "")

    print("| position | " + " | ".join(f"ppl @ {n}" for n in LENGTHS) + " | seeds |\n|---|" + "---|" * (len(LENGTHS) + 1))
    for variant, rs in by("extrapolation").items():
        print(f"| {variant} | " + " | ".join(pm([r["perplexity"][str(n)] for r in rs]) for n in LENGTHS) + f" | {len(rs)} |")
    print("\n| MoE variant | parameters | held-out ppl @128 | max expert share (mean over layers) | experts < 1 % "
          "(of 32) | balancing loss held out | seeds |\n|---|---|---|---|---|---|---|")
    for variant, rs in by("moe").items():
        routed = [r for r in rs if "routing" in r]
        share = [statistics.mean(max(layer) for layer in r["routing"]) for r in routed]
        dead = [sum(v < 0.01 for layer in r["routing"] for v in layer) for r in routed]
        aux = [r["aux_loss_held_out"] for r in routed]
        print(f"| {variant} | {rs[0]['parameters']:,} | {pm([r['perplexity'] for r in rs])} | "
              f"{pm([100 * s for s in share]) + ' %' if share else '-'} | {' / '.join(map(str, dead)) or '-'} | "
              f"{' / '.join(f'{a:.3f}' for a in aux) or '-'} | {len(rs)} |")
    print("\n| Transformer-XL | held-out ppl (same scored tokens) | seeds |\n|---|---|---|")
    for variant, rs in by("xl").items():
        print(f"| {variant} | {pm([r['perplexity'] for r in rs])} | {len(rs)} |")
    for r in by("xl-cost").get("ratio", []):
        print(f"\nseed {r['seed']}: XL {r['xl_ms_per_token']:.2f} ms/token, sliding window {r['window_ms_per_token']:.2f} "
              f"ms/token: {r['ratio']:.1f}x")
    print("\n| key-value heads | KV cache | decode tokens/s |\n|---|---|---|")
    for variant, rs in by("gqa").items():
        print(f"| {variant[2:]} | {rs[0]['kv_cache_bytes'] / 2**20:.2f} MiB | {rs[0]['decode_tokens_per_s']:.0f} |")
    for r in by("speed").get("hfx_lm vs llama", []):
        print(f"\nspeed ({r['threads']} thread(s)): step {r['step']['hfx_lm_s'] * 1e3:.1f} vs {r['step']['llama_s'] * 1e3:.1f} ms "
              f"(ratio {r['step']['ratio']:.3f}); decode {r['decode']['hfx_lm_s']:.2f} vs {r['decode']['llama_s']:.2f} s "
              f"(ratio {r['decode']['ratio']:.3f})")


def plot_routing(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines()) if "routing" in r and r["seed"] == 0]
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.2), sharey=True)
    for ax, r in zip(axes if len(rows) > 1 else [axes], rows, strict=True):
        for i, layer in enumerate(r["routing"]):
            ax.bar([e + 0.2 * i - 0.3 for e in range(len(layer))], [100 * s for s in layer], width=0.2, label=f"layer {i}")
        ax.axhline(100 / len(r["routing"][0]), color="k", lw=0.8, ls="--")
        ax.set_title(r["variant"])
        ax.set_xlabel("expert")
    axes[0].set_ylabel("share of top-2 assignments (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "figures" / "lm_moe_routing.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", nargs="+", default=["extrapolation", "moe", "xl", "gqa"],
                        choices=["extrapolation", "moe", "xl", "gqa", "speed"])
    from hfx.cli import _non_negative_int, _positive_int

    parser.add_argument("--seeds", type=_non_negative_int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=_positive_int, default=600)
    parser.add_argument("--out", type=Path, default=Path("outputs/lm_experiments"))
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(args.out)
        (Path(__file__).parent / "figures").mkdir(exist_ok=True)
        plot_routing(args.out)
        return
    import hfx  # noqa: F401

    for part in args.part:
        if part == "extrapolation":
            part_extrapolation(args.out, args.seeds, args.steps)
        elif part == "moe":
            part_moe(args.out, args.seeds, args.steps)
        elif part == "xl":
            part_xl(args.out, args.seeds, args.steps)
        elif part == "gqa":
            part_gqa(args.out)
        else:
            part_speed(args.out)


if __name__ == "__main__":
    main()
