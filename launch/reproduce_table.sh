#!/usr/bin/env bash
# The paper's table on one node without SLURM: FD-MobileNet 1x, 0.5x and 0.25x one after another, each run
# through launch/local.sh (torchrun, one process per GPU; 2 CPU processes on gloo without GPUs).
#
#   launch/reproduce_table.sh [section.key=value ...]     (extra words go to every run's train_ddp.py)
#   python -m benchmarks.accuracy_table checkpoints/table  (the table, also while runs are in progress)
#
# Width W runs configs/experiments/W-FDMobileNet-224.yaml (the paper's recipe) as label W-FDMobileNet-224 with
# train.output_dir=checkpoints/table; its commit and resolved config land in checkpoints/table/<label>.config.yaml.
# Environment: WIDTHS, TABLE_DIR, TABLE_EXPERIMENT (launch/table_runs.sh), and local.sh's (NPROC_PER_NODE, ...).
# Stops at the first run that fails or whose torchrun is signalled (Ctrl-C, SIGTERM to the job). Run it again
# to continue: every run resumes from its checkpoint (train.auto_resume) and a finished one ends at once.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$ROOT/launch/table_runs.sh"
cd "$ROOT"
for width in "${TABLE_WIDTHS[@]}"; do
  table_run_args "$width"
  echo "$(date +%T) reproduce_table: $width: launch/local.sh ${RUN_ARGS[*]} $*"
  "$ROOT/launch/local.sh" "${RUN_ARGS[@]}" "$@"
done
echo "$(date +%T) reproduce_table: ${TABLE_WIDTHS[*]} done; the table: $PYTHON -m benchmarks.accuracy_table $TABLE_DIR"
