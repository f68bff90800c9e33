#!/usr/bin/env bash
# The README's main command (`make demo`): build the demo set, train FD-MobileNet 0.25x on it with the full
# trainer, and check that it learned.
#
#   launch/demo.sh [section.key=value ...]        (extra words go to train_ddp.py)
#
# 1. python -m pipelines.demo_data data/digits: scikit-learn's 1,797 handwritten digits as 64x64 JPEGs
#    (built once; ~3 s).
# 2. launch/local.sh configs/experiments/demo.yaml: torchrun with 2 CPU ranks on gloo and the DALI CPU
#    pipeline here; on a GPU machine one rank per GPU with NCCL, the DALI GPU pipeline, AMP and torch.compile
#    (the config's "auto" settings). --fresh: a demo always starts from scratch.
# 3. Fails unless the final val top-1 (checkpoints/demo.jsonl) is at least 90 %.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"
"$PYTHON" -m pipelines.demo_data data/digits
start=$(date +%s)
"$ROOT/launch/local.sh" configs/experiments/demo.yaml --fresh "$@"
"$PYTHON" - "$(( $(date +%s) - start ))" <<'PY'
import json, sys
last = [json.loads(line) for line in open("checkpoints/demo.jsonl")][-1]
print(f"demo: {sys.argv[1]} s of training, final val top-1 {last['val_top1']:.2f}% "
      f"(per-epoch CSV: checkpoints/demo.csv, curves: checkpoints/demo.png)")
if last["val_top1"] < 90:
    sys.exit(f"demo: val top-1 {last['val_top1']:.2f}% is below the 90 % the demo promises")
PY
