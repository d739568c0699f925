#!/usr/bin/env bash
# The tiny pipeline on CPU, end to end, in a few minutes: set up, train a BPE tokenizer on real text,
# pretrain a depth-4 model, sample from it, then mid-train and SFT it on the offline conversation mixture and
# chat with it. Artifacts go to $NANOCHAT_BASE_DIR (default .nanochat-tiny/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$PWD/.nanochat-tiny}
export NANOCHAT_SHARED_DATA=${NANOCHAT_SHARED_DATA:-$(cd .. && pwd)/shared/data}
export NANOCHAT_DATA_DIR=${NANOCHAT_DATA_DIR:-$NANOCHAT_SHARED_DATA/pretrain}
PY=.venv/bin/python

echo "== tokenizer: 4,096-token BPE on ~20M characters of the training shards"
$PY -m nanochat.tok_train --max-chars=20000000 --vocab-size=4096
echo "== base model: depth 4 (5.2M parameters), 120 steps of 4,096 tokens"
$PY -m nanochat.base_train --depth=4 --max-seq-len=256 --device-batch-size=16 --total-batch-size=4096 \
    --num-iterations=120 --eval-every=40 --eval-tokens=65536 --sample-every=-1 --log-every=10
echo "== base samples"
$PY -m nanochat.sample --source=base --temperature=0.8 --num-samples=2 --max-tokens=32 \
    --prompt="The Python standard library" --prompt="To be, or not to be"
echo "== mid-training: 40 steps on the offline conversation mixture"
$PY -m nanochat.mid_train --device-batch-size=16 --total-batch-size=4096 --num-iterations=40 --eval-every=20 \
    --eval-tokens=32768 --log-every=10
echo "== SFT: 40 steps of 8 conversations, loss on assistant tokens only"
$PY -m nanochat.chat_sft --device-batch-size=4 --examples-per-step=8 --num-iterations=40 --eval-every=20 \
    --eval-steps=10 --log-every=10
echo "== chat with the SFT model"
$PY -m nanochat.sample --source=sft --chat --temperature=0.6 --max-tokens=48 \
    --prompt="Hello! Who are you?" --prompt="What is 12 times 7?"
