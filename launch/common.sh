# Shared by launch/*.sh and launch/*.sbatch (sourced, not run). Sets:
#   ROOT      the repository root
#   PYTHON    the interpreter (PYTHON env, else ROOT/.venv/bin/python, else python3)
#   TRAIN     the training script (TRAIN env, default ROOT/train_ddp.py; the tests point it at stand-ins)
#   TORCHRUN  torchrun as a module of $PYTHON (same interpreter as the workers, no PATH surprises)
# and the thread / NCCL defaults below. Every default can be overridden from the environment.

ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
TRAIN=${TRAIN:-$ROOT/train_ddp.py}

# torchrun forwards these to the workers (SIGUSR1/2 are what SLURM sends ahead of a time limit); the workers
# checkpoint at the next step boundary and exit. It waits SHUTDOWN_TIMEOUT s for them before SIGKILL: long
# enough for one step plus a checkpoint write, shorter than SLURM's USR1 lead time (120 s in slurm.sbatch).
SIGNALS_TO_HANDLE=${SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-90}
TORCHRUN=("$PYTHON" -m torch.distributed.run "--signals-to-handle=$SIGNALS_TO_HANDLE"
          "--shutdown-timeout=$SHUTDOWN_TIMEOUT" "--max-restarts=${MAX_RESTARTS:-0}")

# Pre-flight: `train_ddp.py --check` in one plain process before any worker starts (fdmobilenet/preflight.py):
# config, data folders, global batch vs the planned world size(s), the checkpoint it would resume from. A
# mistake there exits 2 with one line, and the launcher exits with that code: torchrun --max-restarts
# restarts a failing worker whatever its exit code, and SLURM would requeue, so the same mistake would run
# (and fail) again and again. Exit codes of a launcher: 0 done (or preempted workers, see below); 2 a
# mistake in the command, its config or its files (the one line says which), nothing started; 1 a worker
# crashed (its traceback is in the log) or torchrun itself was signalled.
preflight() {  # $1 = planned world size(s), comma-separated; then the trainer's arguments
  local world=$1; shift
  "$PYTHON" "$TRAIN" --check --world-size "$world" "$@"
}

# Processes per node: one per visible GPU (CUDA_VISIBLE_DEVICES honoured), else 2 CPU processes on gloo.
gpus_per_node() {
  if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
    local ids=${CUDA_VISIBLE_DEVICES//,/ }; set -- $ids; echo $#; return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; return
  fi
  echo 0
}
default_nproc() {
  local n; n=$(gpus_per_node)
  if (( n > 0 )); then echo "$n"; else echo 2; fi
}

# Threads: torchrun alone would set OMP_NUM_THREADS=1 for every worker. One core per worker is right on a
# CPU-only node; on a GPU node each worker gets its share of the cores (the DALI CPU stages and the
# host-side optimizer bookkeeping use them). Set OMP_NUM_THREADS yourself to override.
omp_threads_for() {  # $1 = processes on this node (cores: the SLURM task's CPUs, else this machine's)
  local cores=${SLURM_CPUS_PER_TASK:-$(nproc 2>/dev/null || echo 1)}
  local t=$(( cores / $1 )); (( t >= 1 )) || t=1; echo "$t"
}

# NCCL: quiet unless something is wrong; a dead peer raises instead of hanging (torch's watchdog aborts the
# communicator). Network selection (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_DISABLE) is site-specific: set
# it in the environment, it passes through.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Elastic restarts: by default the c10d rendezvous lends the workers ONE TCPStore for every restart round
# (torch 2.14), so the restarted workers can read the dead round's gloo/NCCL addresses and hang or fail in
# connectFullMesh (seen here in 2 of 3 restarts). Opting out gives each round a fresh store on worker rank 0.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# Python output reaches the log as it happens (the tests and `tail -f` wait on log lines).
export PYTHONUNBUFFERED=1

# SLURM: run "$@" (an srun command line) in the background and wait for it, so that the batch shell can act on
# signals (bash runs a trap only between commands). SIGUSR1 — what `#SBATCH --signal=B:USR1@120` sends
# 120 s before the time limit — is forwarded to the step (srun passes it to every task: torchrun forwards it to
# its workers; the workers checkpoint at the next step boundary and exit), and once the step has ended the
# job is requeued: the next run auto-resumes from checkpoints/{label}.pth.tar. SIGTERM (scancel, or
# preemption by the scheduler, which requeues by itself when so configured) is forwarded too, without a
# requeue. Returns the step's exit status.
run_step_requeue_on_usr1() {
  local pid rc interrupted requeue=0
  trap 'interrupted=1; requeue=1; echo "$(date +%T) batch shell: SIGUSR1 -> step (checkpoint and stop), then requeue"; kill -USR1 "$pid" 2>/dev/null' USR1
  trap 'interrupted=1; echo "$(date +%T) batch shell: SIGTERM -> step"; kill -TERM "$pid" 2>/dev/null' TERM
  "$@" &
  pid=$!
  while :; do
    interrupted=0
    wait "$pid"; rc=$?
    (( interrupted )) || break      # a trap interrupted the wait, the step is still running (or just ended)
  done
  trap - USR1 TERM
  echo "$(date +%T) step ended with exit code $rc"
  if (( requeue )); then
    # said first: a successful requeue ends this shell at once ("CANCELLED ... DUE TO JOB REQUEUE")
    echo "$(date +%T) requeueing job $SLURM_JOB_ID (restarts so far: ${SLURM_RESTART_COUNT:-0})"
    scontrol requeue "$SLURM_JOB_ID" ||
      echo "$(date +%T) requeue of job $SLURM_JOB_ID failed: resubmit by hand; training resumes from the checkpoint" >&2
  fi
  return "$rc"
}

