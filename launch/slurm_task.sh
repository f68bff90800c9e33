#!/bin/bash
# What each srun task of launch/slurm.sbatch and launch/slurm_srun.sbatch runs on its node (not meant to be
# called by hand): check that this node resolves the rendezvous host and has the interfaces that
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name (check_node_network in launch/common.sh), then become this
# node's part of the job.
#
#   slurm_task.sh torchrun HOST:PORT [train_ddp.py arguments]   slurm.sbatch: one torchrun per node, one
#       worker per GPU of THIS node (NPROC_PER_NODE, else SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES /
#       nvidia-smi), else 2 CPU workers on gloo; c10d rendezvous at HOST:PORT
#   slurm_task.sh rank HOST [train_ddp.py arguments]            slurm_srun.sbatch: this task is one rank
#
# Each node decides its own worker count and threads, so nodes with different GPU counts in one allocation
# get the right number each. A failed check exits 2 with one line that names this node; srun
# --kill-on-bad-exit=1 then ends the step on every node.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mode=$1 endpoint=$2
shift 2
# srun --kill-on-bad-exit=1 ends the step as soon as a task exits non-zero, and the line still on its way from
# this node to srun is lost with it (seen under load): give it 2 s to arrive first
check_node_network "${endpoint%:*}" "$SLURM_NNODES" || { sleep 2; exit 2; }
case $mode in
  torchrun)
    NPROC_PER_NODE=$(slurm_nproc_per_node)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(omp_threads_for "$NPROC_PER_NODE")}
    echo "$(date +%T) ${SLURMD_NODENAME:-$(hostname)}: torchrun with $NPROC_PER_NODE worker(s)," \
         "OMP_NUM_THREADS=$OMP_NUM_THREADS"
    exec "${TORCHRUN[@]}" --nnodes="$SLURM_NNODES" --nproc-per-node="$NPROC_PER_NODE" --rdzv-backend=c10d \
      --rdzv-endpoint="$endpoint" --rdzv-id="$SLURM_JOB_ID" "$TRAIN" "$@";;
  rank)
    exec "$PYTHON" "$TRAIN" "$@";;
  *)
    echo "slurm_task.sh: unknown mode '$mode' (torchrun or rank)" >&2
    exit 2;;
esac
