#!/usr/bin/env bash
# Train on N nodes: run this once on every node; torchrun's c10d rendezvous assigns the ranks.
#
#   launch/multinode.sh [--nnodes N] [--endpoint HOST:PORT] [--job-id ID] [--nproc-per-node K]
#                       [--] --config CONFIG.yaml [--label NAME] [section.key=value ...]
#
# Each option falls back to the environment: NNODES, RDZV_ENDPOINT (or MASTER_ADDR:MASTER_PORT), JOB_ID,
# NPROC_PER_NODE (default: GPUs on this node, else 2 CPU processes on gloo). The endpoint is any one node's
# address (the first node's, by convention) plus a free port; it must be the same on every node, and so must
# the job id (a fresh one per job: it names the rendezvous). The remaining arguments go to train_ddp.py.
#
# Elasticity: MAX_RESTARTS (default 3) restarts all workers of all nodes after a worker crash; the trainer
# resumes from checkpoints/{label}.pth.tar. --nnodes may be a range MIN:MAX (torchrun's elastic form).
# Exit code: 0 done; 2 the pre-flight found a mistake (one line; no worker started on this node), or this node
# cannot resolve the endpoint's host or lacks an interface named in GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
# (launch/common.sh check_node_network: one line naming the node and what to set), or a usage error; 1 from
# torchrun when a worker failed; 128 + N when torchrun got signal N (the workers checkpoint first and log
# "preempted", or "interrupted" after Ctrl-C, 130; run the same command again to resume).
set -euo pipefail
MAX_RESTARTS=${MAX_RESTARTS:-3}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NNODES=${NNODES:-}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-${MASTER_ADDR:+$MASTER_ADDR:${MASTER_PORT:-29500}}}
JOB_ID=${JOB_ID:-}
NPROC_PER_NODE=${NPROC_PER_NODE:-}
while (( $# )); do
  case $1 in
    --nnodes) NNODES=$2; shift 2;;            --nnodes=*) NNODES=${1#*=}; shift;;
    --endpoint) RDZV_ENDPOINT=$2; shift 2;;   --endpoint=*) RDZV_ENDPOINT=${1#*=}; shift;;
    --job-id) JOB_ID=$2; shift 2;;            --job-id=*) JOB_ID=${1#*=}; shift;;
    --nproc-per-node) NPROC_PER_NODE=$2; shift 2;; --nproc-per-node=*) NPROC_PER_NODE=${1#*=}; shift;;
    --) shift; break;;
    *) break;;
  esac
done
missing=()
[[ -n $NNODES ]] || missing+=("--nnodes N (or NNODES)")
[[ -n $RDZV_ENDPOINT ]] || missing+=("--endpoint HOST:PORT (or RDZV_ENDPOINT, or MASTER_ADDR[+MASTER_PORT])")
[[ -n $JOB_ID ]] || missing+=("--job-id ID (or JOB_ID; the same on every node)")
if (( ${#missing[@]} )); then
  printf 'multinode.sh: missing %s\n' "${missing[@]}" >&2
  echo "usage: launch/multinode.sh --nnodes N --endpoint HOST:PORT --job-id ID [--] --config CONFIG.yaml [overrides]" >&2
  exit 2
fi
check_node_network "${RDZV_ENDPOINT%:*}" "$NNODES" || exit 2   # names and interfaces, before torchrun
NPROC_PER_NODE=${NPROC_PER_NODE:-$(default_nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(omp_threads_for "$NPROC_PER_NODE")}
# every world size the job may run at: NNODES, or each node count of an elastic MIN:MAX range
worlds=()
for (( n = ${NNODES%%:*}; n <= ${NNODES##*:}; n++ )); do worlds+=("$(( n * NPROC_PER_NODE ))"); done
preflight "$(IFS=,; echo "${worlds[*]}")" "$@" || exit $?
exec "${TORCHRUN[@]}" "--nnodes=$NNODES" "--nproc-per-node=$NPROC_PER_NODE" \
  --rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=$JOB_ID" "$TRAIN" "$@"
