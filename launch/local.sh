#!/usr/bin/env bash
# Train on this machine: torchrun, one process per GPU (auto-detected), or 2 CPU processes on gloo.
#
#   launch/local.sh --config CONFIG.yaml [--label NAME] [section.key=value ...]  (arguments go to train_ddp.py)
#
# Environment: NPROC_PER_NODE (default: GPU count, else 2), MAX_RESTARTS (default 0; >0 restarts every
# worker after a crash, and the trainer resumes from checkpoints/{label}.pth.tar), OMP_NUM_THREADS,
# PYTHON, TRAIN, plus the NCCL knobs in launch/common.sh.
# Exit code: 0 when the run is done, and also when only the workers got SIGTERM/SIGUSR1 (they checkpoint at
# the next agreed step, print "preempted ... checkpoint saved" and exit 0: run the command again to resume);
# 2 when the pre-flight (train_ddp.py --check, launch/common.sh) found a mistake: one line, no worker started;
# 1 when a worker failed; 128 + N when torchrun itself got signal N (it forwards it, waits for the workers to
# checkpoint and exit, then prints "torchrun: stopped by SIGNAME ...": launch/torchrun.py). Ctrl-C is such a
# signal: the terminal's SIGINT reaches torchrun (not the workers, each in a process group of its own), torchrun
# forwards it once, the workers checkpoint at an agreed step and print "interrupted (SIGINT) ... checkpoint
# saved ...", and the launcher exits 130; a second Ctrl-C stops the workers at once.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(default_nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(omp_threads_for "$NPROC_PER_NODE")}
preflight "$NPROC_PER_NODE" "$@" || exit $?
# --standalone: a private c10d store on a free local port, so two local jobs never collide.
exec "${TORCHRUN[@]}" --standalone --nnodes=1 "--nproc-per-node=$NPROC_PER_NODE" "$TRAIN" "$@"
