#!/usr/bin/env bash
# The GPU check: every speed figure on the GPUs of this machine, in about 8 minutes, installing nothing.
#   bash scripts/gpu_check.sh             # needs the CUDA wheel of the pinned torch; prints what to install if not
#   bash scripts/gpu_check.sh --dry-run   # prints the plan and runs the CPU-sized version of each step (CI)
# Steps: bench train at depth 12 and 20 (bf16, compiled; MFU against the datasheet), bench decode at batch
# 1/8/32, bench core, and a short single-node torchrun base_train on all visible GPUs that saves, then resumes.
# Every JSON line goes to $OUT (else .test-artifacts/gpu/), with each step's log and summary.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT_DIR=${OUT:-$PWD/.test-artifacts/gpu}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
export NANOCHAT_SHARED_DATA=${NANOCHAT_SHARED_DATA:-$(cd .. && pwd)/shared/data}
export NANOCHAT_DATA_DIR=${NANOCHAT_DATA_DIR:-$NANOCHAT_SHARED_DATA/pretrain}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$OUT_DIR/base}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [[ $DRY == 1 ]]; then
    NGPU=1
    DEV=(--device-type=cpu --dtype=float32)
    TRAIN12=(--depth=1 --vocab-size=1024 --seq-len=64 --batch-size=2 --steps=2 --warmup=1)
    TRAIN20=(--depth=2 --vocab-size=1024 --seq-len=64 --batch-size=2 --steps=2 --warmup=1)
    DECODE=(--depth=2 --vocab-size=1024 --prompt-len=16 --max-new-tokens=8)
    CORE=(--depth=1 --vocab-size=1024 --seq-len=256 --max-per-task=2 --tasks=copa,winograd,lambada_openai)
    TOK=(--max-chars=300000 --vocab-size=1024)
    RUN=(--depth=1 --max-seq-len=64 --device-batch-size=2 --total-batch-size=128 --eval-tokens=256
         --device-type=cpu --dtype=float32)
    ITERS=(4 6)
    LIMIT=120
else
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || echo "2.13.0")
        echo "no CUDA build of torch, or no visible GPU. Install the CUDA wheel of the pinned torch:" >&2
        echo "  $PY -m pip install torch==$version --index-url https://download.pytorch.org/whl/cu128" >&2
        exit 2
    fi
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    DEV=(--device-type=cuda --dtype=bfloat16)
    TRAIN12=(--depth=12 --vocab-size=65536 --seq-len=2048 --batch-size=16 --steps=10 --warmup=3 --compile)
    TRAIN20=(--depth=20 --vocab-size=65536 --seq-len=2048 --batch-size=16 --steps=10 --warmup=3 --compile)
    DECODE=(--depth=20 --vocab-size=65536 --prompt-len=256 --max-new-tokens=128)
    CORE=(--depth=12 --vocab-size=65536 --seq-len=2048 --max-per-task=100)
    TOK=(--max-chars=20000000 --vocab-size=65536)
    RUN=(--depth=12 --max-seq-len=2048 --device-batch-size=16 --total-batch-size=$((16 * 2048 * NGPU))
         --eval-tokens=$((16 * 2048 * NGPU * 4)))
    ITERS=(60 90)
    LIMIT=150
fi

steps=("train d12" "train d20" "decode" "core" "tokenizer" "torchrun base_train + save" "torchrun --resume")
echo "== GPU check ($([[ $DRY == 1 ]] && echo "dry run, CPU sizes" || echo "$NGPU GPU(s)")): output in $OUT_DIR"
for s in "${steps[@]}"; do echo "   - $s"; done

status=0
run() {  # run NAME LOGFILE CMD...: a step under its time limit; a failure is recorded and the next step runs
    local name=$1 log=$2
    shift 2
    echo "== $name"
    local t0=$SECONDS
    timeout "$LIMIT" "$@" > >(tee "$OUT_DIR/$log") 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$OUT_DIR/steps.jsonl"
    [[ $rc == 0 ]] || { echo "!! $name failed (rc $rc), see $OUT_DIR/$log"; status=1; }
}
: > "$OUT_DIR/steps.jsonl"
BENCH=("$PY" -m nanochat.bench)
run "train d12" train_d12.jsonl "${BENCH[@]}" train "${TRAIN12[@]}" "${DEV[@]}"
run "train d20" train_d20.jsonl "${BENCH[@]}" train "${TRAIN20[@]}" "${DEV[@]}"
run "decode" decode.jsonl "${BENCH[@]}" decode "${DECODE[@]}" --batch-sizes=1,8,32 "${DEV[@]}"
run "core" core.jsonl "${BENCH[@]}" core "${CORE[@]}" "${DEV[@]}"
run "tokenizer" tok_train.log "$PY" -m nanochat.tok_train "${TOK[@]}"
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m nanochat.base_train
          "${RUN[@]}" --model-tag=gpucheck --eval-every=-1 --sample-every=-1 --log-every=5)
run "torchrun base_train + save" base_train.log "${TORCHRUN[@]}" --num-iterations="${ITERS[0]}" \
    --save-every=$((ITERS[0] / 2))
run "torchrun --resume" base_train_resume.log "${TORCHRUN[@]}" --num-iterations="${ITERS[1]}" --resume

"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
def lines(name):
    path = out / name
    if not path.is_file():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")]
print(f"{'figure':<34} {'value':>14} {'limit / ratio':>28}")
for name in ("train_d12.jsonl", "train_d20.jsonl"):
    for r in lines(name):
        mfu = f"MFU {r['mfu_percent']}%" if "mfu_percent" in r else f"{r['ratio_to_matmul_peak']:.2f} of matmul"
        print(f"{'train d' + str(r['depth']) + ' tok/s':<34} {r['tok_per_sec']:>14,.0f} {mfu:>28}")
for r in lines("decode.jsonl"):
    print(f"{'decode batch ' + str(r['batch']) + ' tok/s':<34} {r['decode_tok_per_sec']:>14,.1f} "
          f"{str(r['ratio_to_bandwidth']) + ' of copy bandwidth':>28}")
for r in lines("core.jsonl"):
    print(f"{'core examples/s (' + r['dtype'] + ')':<34} {r['examples_per_sec']:>14,.2f} {r['core_label']:>28}")
for log in ("base_train.log", "base_train_resume.log"):
    path = out / log
    text = path.read_text() if path.is_file() else ""
    steps = re.findall(r"step (\d+)/\d+ .*tok/s ([\d,]+)", text)
    resumed = "resumed from" in text
    if steps:
        print(f"{log.removesuffix('.log') + ' tok/s':<34} {steps[-1][1]:>14} "
              f"{'step ' + steps[-1][0] + (' (resumed)' if resumed else ''):>28}")
for s in lines("steps.jsonl"):
    print(f"{'step: ' + s['step']:<34} {'ok' if s['rc'] == 0 else 'rc ' + str(s['rc']):>14} {str(s['seconds']) + ' s':>28}")
EOF
exit $status
