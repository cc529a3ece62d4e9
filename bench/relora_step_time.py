"""ReLoRA step time against plain peft LoRA on the same model (anchor: peft LoRA; target <= 1.05x).

Both sides train the same Llama built from a config (same seed, same data, same AdamW, LoRA of the same
rank on every attention and MLP linear). ReLoRA restarts every ``--relora-steps`` steps and the time of
each restart (merge, re-initialisation, optimizer-state pruning) is counted in the step where it happens,
so the ratio is the amortised cost. The two sides run in alternating blocks of ``--block`` steps (short
blocks, alternating which side goes first), so a machine shared with other jobs slows both alike; the
ratio of the summed times is reported, with the median of the per-block ratios as a check that a few
blocks hit by a burst of load did not decide it.

    .venv/bin/python bench/relora_step_time.py                 # about 5 minutes on an idle 2-core CPU
    .venv/bin/python bench/relora_step_time.py --device cuda --hidden 1024 --layers 8 --batch 16
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import peft
import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import hfx  # noqa: F401  (registers ReLoRA with peft)
from hfx.peft import ReLoraConfig, get_relora_schedule, is_restart_step, relora_restart


def build(kind: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(args.device)
    common = dict(r=args.rank, lora_alpha=args.rank, target_modules="all-linear")
    relora = ReLoraConfig(
        **common, relora_steps=args.relora_steps, restart_warmup_steps=args.relora_steps // 5, warmup_steps=10
    )
    model = peft.get_peft_model(base, relora if kind == "relora" else peft.LoraConfig(**common))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    # Both sides step the same jagged schedule, so the schedule is not part of the difference.
    scheduler = get_relora_schedule(optimizer, num_training_steps=args.steps + args.warmup, config=relora)
    return model, optimizer, scheduler


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps per side")
    parser.add_argument("--block", type=int, default=2, help="steps per alternating block")
    parser.add_argument("--relora-steps", type=int, default=40, help="ReLoRA restart period")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadier on a shared CPU)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.steps % args.block:
        parser.error("--steps must be a multiple of --block")
    torch.set_num_threads(args.threads)

    sides = {kind: build(kind, args) for kind in ("lora", "relora")}
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator) for _ in range(8)]
    done = dict.fromkeys(sides, 0)
    restarts = 0

    def run(kind: str, n: int) -> float:
        nonlocal restarts
        model, optimizer, scheduler = sides[kind]
        sync(args.device)
        start = time.perf_counter()
        for _ in range(n):
            batch = batches[done[kind] % len(batches)].to(args.device)
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done[kind] += 1
            if kind == "relora" and is_restart_step(done[kind] - args.warmup, relora_steps=args.relora_steps):
                relora_restart(model, optimizer, step=done[kind])
                restarts += 1
        sync(args.device)
        return time.perf_counter() - start

    for kind in sides:
        run(kind, args.warmup)
    times = {kind: [] for kind in sides}
    for block in tqdm(range(args.steps // args.block), desc="alternating blocks"):
        order = ("lora", "relora") if block % 2 == 0 else ("relora", "lora")
        for kind in order:
            times[kind].append(run(kind, args.block))

    total = {kind: sum(t) for kind, t in times.items()}
    ratio = total["relora"] / total["lora"]
    median_ratio = statistics.median(ours / anchor for ours, anchor in zip(times["relora"], times["lora"]))
    trainable = {
        kind: sum(p.numel() for p in sides[kind][0].parameters() if p.requires_grad) for kind in sides
    }
    params = sum(p.numel() for p in sides["lora"][0].get_base_model().parameters())
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {args.device}"
    if args.device.startswith("cuda"):
        machine += f" ({torch.cuda.get_device_name()})"
    print(f"### ReLoRA vs peft LoRA step time ({datetime.date.today().isoformat()})")
    print(f"- machine: {machine}")
    print(f"- model: Llama {params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), "
          f"batch {args.batch} x {args.seq} tokens, LoRA r={args.rank} on all attention+MLP linears "
          f"({trainable['lora']:,} trainable; ReLoRA {trainable['relora']:,})")
    print(f"- {args.steps} timed steps per side in alternating blocks of {args.block}; ReLoRA restarted "
          f"every {args.relora_steps} steps ({restarts} restarts, counted in the timing)")
    print(f"- peft LoRA: {1000 * total['lora'] / args.steps:.1f} ms/step; ReLoRA: {1000 * total['relora'] / args.steps:.1f} ms/step")
    print(f"- **ratio ReLoRA / LoRA: {ratio:.3f}x** (median of per-block ratios {median_ratio:.3f}x; target <= 1.05x)")


if __name__ == "__main__":
    main()
