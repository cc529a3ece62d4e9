#!/usr/bin/env bash
# The checks of issue 21 that need a GPU, as one prepared script for a machine that has one; where there is
# no CUDA device (or with --cpu-only) it runs the CPU subset: the FSDP / bf16 / 2-machine tests of
# tests/test_scale_out.py. Every check runs even when an earlier one fails; the exit status is 1 if any failed.
#
#   bash bench/gpu_check.sh              # GPU checks if CUDA is there, else the CPU subset
#   bash bench/gpu_check.sh --cpu-only   # the CPU subset only
#   OUT=/some/dir PEAK_TFLOPS=989 bash bench/gpu_check.sh
#
# GPU checks (logs and one summary.md under $OUT, default outputs/gpu_check/):
#   1. the NaN policy under fp16 with loss scaling and under bf16, with a forced overflow (pytest, on the GPU)
#   2. lm-stdlib in bf16 and in fp16 (gradient scaler): the loss falls, saved weights are float32
#   3. DDP on the GPUs (multi-gpu.yaml; needs 2 GPUs) and FSDP2 (fsdp.yaml, 1 process per GPU): final/ loads
#   4. SDPA against eager attention on the lm-stdlib Llama: same logits (bf16 tolerance), time of a step
#   5. throughput: the demo's diffusion training (ddpm-digits) and lm-stdlib, with lm-stdlib's MFU
#   6. the batched classifier-free-guidance sampling ratio (bench/sampling.py)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-outputs/gpu_check}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}   # dense bf16 of an H100 / H200 SXM; set it for another GPU
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
status=0

cpu_only=0
[ "${1:-}" = "--cpu-only" ] && cpu_only=1
gpus=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
[ "$gpus" = "0" ] && cpu_only=1

check() {  # check NAME COMMAND...: run it, log it, record pass/fail in the summary
  local name=$1; shift
  echo "== $name"
  local start=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then
    echo "| $name | pass | $((SECONDS - start)) s |" >> "$SUMMARY"
  else
    echo "| $name | FAIL (see $name.log) | $((SECONDS - start)) s |" >> "$SUMMARY"
    tail -20 "$OUT/$name.log"
    status=1
  fi
}

{ echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) on $($PY -c 'import platform, torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine())') (GPUs: $gpus)"
  echo; echo "| check | result | time |"; echo "|---|---|---|"; } > "$SUMMARY"

if [ "$cpu_only" = 1 ]; then
  echo "no CUDA device (or --cpu-only): the CPU subset"
  check cpu-scale-out-tests $PY -m pytest -q -p no:cacheprovider tests/test_scale_out.py
  cat "$SUMMARY"
  exit $status
fi

# lm-stdlib, small and quick; no evaluation or checkpoints unless asked
LM=(lm-stdlib "data.options={max_files: 50}" train.max_steps=100 eval.every_steps=null eval.at_end=false
    checkpoint.every_steps=null "log.report_to=[]" log.every_steps=10)

loss_falls_and_float32() {  # RUN_DIR: the last logged loss is below the first, final/ holds float32 weights
  $PY - "$1" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
run = Path(sys.argv[1])
losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
dtypes = {str(v.dtype) for v in load_file(run / "final" / "model.safetensors").values()}
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved dtypes {dtypes}")
assert losses[-1] < losses[0] - 0.5 and dtypes == {"torch.float32"}
EOF
}

precision_run() {  # PRECISION
  rm -rf "$OUT/lm-$1"
  $PY -m hfx train "${LM[@]}" "train.mixed_precision=$1" "output_dir=$OUT/lm-$1" && loss_falls_and_float32 "$OUT/lm-$1"
}

launched_run() {  # NAME CONFIG: lm-stdlib launched with an accelerate config, one process per GPU; final/ loads
  rm -rf "$OUT/$1"
  $PY -m accelerate.commands.launch --config_file "training/accelerate/$2" --num_processes "$gpus" \
    -m hfx train "${LM[@]}" "output_dir=$OUT/$1" train.max_steps=60 checkpoint.every_steps=30 || return 1
  loss_falls_and_float32 "$OUT/$1" && $PY -c "
import sys; from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('final/ loads:', type(m).__name__)" "$OUT/$1/final"
}

sdpa_vs_eager() {
  $PY - <<'EOF'
import time, torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
           num_key_value_heads=8)
ids = torch.randint(0, 4096, (32, 512), device="cuda")
times, logits = {}, {}
for impl in ("eager", "sdpa"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=impl)).cuda()
    with torch.autocast("cuda", torch.bfloat16):
        logits[impl] = model(ids).logits.float()
        for i in range(13):
            if i == 3:
                torch.cuda.synchronize(); start = time.perf_counter()
            model(ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
    times[impl] = (time.perf_counter() - start) / 10
diff = (logits["sdpa"] - logits["eager"]).abs().max().item()
print(f"step eager {times['eager'] * 1e3:.1f} ms, sdpa {times['sdpa'] * 1e3:.1f} ms, sdpa/eager "
      f"{times['sdpa'] / times['eager']:.3f}; max logit difference {diff:.3g}")
assert diff < 0.1
EOF
}

throughput() {
  rm -rf "$OUT/tp-ddpm" "$OUT/tp-lm"
  $PY -m hfx train ddpm-digits train.max_steps=200 eval.every_steps=null eval.at_end=false checkpoint.every_steps=null \
    "log.report_to=[]" log.every_steps=50 train.mixed_precision=bf16 "output_dir=$OUT/tp-ddpm" || return 1
  $PY -m hfx train lm-stdlib train.max_steps=200 eval.every_steps=null eval.at_end=false checkpoint.every_steps=null \
    "log.report_to=[]" log.every_steps=50 train.mixed_precision=bf16 "output_dir=$OUT/tp-lm" || return 1
  $PY - "$OUT" "$PEAK_TFLOPS" <<'EOF'
import json, sys
from pathlib import Path
out, peak = Path(sys.argv[1]), float(sys.argv[2]) * 1e12
def rate(run):  # samples/s of the steady state (the last log windows)
    recs = [r for r in map(json.loads, (out / run / "metrics.jsonl").read_text().splitlines()) if "samples_per_s" in r]
    return sum(r["samples_per_s"] for r in recs[-2:]) / len(recs[-2:])
cfg = json.loads((out / "tp-lm" / "final" / "config.json").read_text())
d, L, V, T = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], 128
n = L * (4 * d * d + 3 * d * cfg["intermediate_size"]) + V * d        # matmul parameters (tied head counted once)
flops_per_token = 6 * n + 12 * L * d * T                               # forward + backward, attention included
tokens = rate("tp-lm") * T
print(f"ddpm-digits: {rate('tp-ddpm'):.0f} images/s; lm-stdlib: {tokens:.0f} tokens/s, "
      f"MFU {100 * tokens * flops_per_token / peak:.2f} % of {peak / 1e12:.0f} TFLOPS")
EOF
}

check overflow-nan-policy $PY -m pytest -q -p no:cacheprovider tests/test_scale_out.py -k "overflow"
check lm-bf16 precision_run bf16
check lm-fp16 precision_run fp16
if [ "$gpus" -ge 2 ]; then check ddp-gpus launched_run ddp multi-gpu.yaml; else
  echo "| ddp-gpus | not run: 1 GPU (DDP needs 2) | |" >> "$SUMMARY"; fi
check fsdp-gpus launched_run fsdp fsdp.yaml
check sdpa-vs-eager sdpa_vs_eager
check throughput throughput
check cfg-sampling-ratio $PY bench/sampling.py --device cuda --rounds 5
for name in sdpa-vs-eager throughput cfg-sampling-ratio; do
  { echo; echo "### $name"; echo '```'; tail -15 "$OUT/$name.log"; echo '```'; } >> "$SUMMARY"
done
cat "$SUMMARY"
exit $status
