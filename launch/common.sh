# Shared by launch/*.sh and launch/*.sbatch (sourced, not run). Sets:
#   ROOT      the repository root
#   PYTHON    the interpreter (PYTHON env, else ROOT/.venv/bin/python, else python3)
#   TRAIN     the training script (TRAIN env, default ROOT/train_ddp.py)
#   TORCHRUN  torchrun run by $PYTHON (same interpreter as the workers, no PATH surprises), through
#             launch/torchrun.py: when torchrun itself is signalled, one line and exit 128 + the signal
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
TORCHRUN=("$PYTHON" "$ROOT/launch/torchrun.py" "--signals-to-handle=$SIGNALS_TO_HANDLE"
          "--shutdown-timeout=$SHUTDOWN_TIMEOUT" "--max-restarts=${MAX_RESTARTS:-0}")

# Pre-flight: `train_ddp.py --check` in one plain process before any worker starts (train_check.py):
# config, data folders, global batch vs the planned world size(s), the checkpoint it would resume from. A
# mistake there exits 2 with one line, and the launcher exits with that code: torchrun --max-restarts
# restarts a failing worker whatever its exit code, and SLURM would requeue, so the same mistake would run
# (and fail) again and again. Exit codes of a launcher: 0 done (or preempted workers, see below); 2 a
# mistake in the command, its config or its files (the one line says which), nothing started; 1 a worker
# crashed (its traceback is in the log); 128 + N torchrun itself got signal N (130: Ctrl-C).
preflight() {  # $1 = planned world size(s), comma-separated; then the trainer's arguments
  local world=$1; shift
  "$PYTHON" "$TRAIN" --check --world-size "$world" "$@"
}

# The port of this SLURM job's rendezvous (29500 + job id mod 10000: two jobs sharing a node do not collide),
# from the one place that defines it, fdmobilenet/slurm_port.py (it and the package import no torch).
slurm_job_port() {
  (cd "$ROOT" && "$PYTHON" -m fdmobilenet.slurm_port)
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
# Workers per node in a SLURM job: NPROC_PER_NODE, else the job's GPUs on this node, else default_nproc.
slurm_nproc_per_node() {
  echo "${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(default_nproc)}}"
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
# Elastic restarts: by default the c10d rendezvous lends the workers ONE TCPStore for every restart round, so
# the restarted workers can read the dead round's gloo/NCCL addresses and hang or fail in connectFullMesh.
# Opting out gives each round a fresh store on worker rank 0.
# On one node the trainer also keys each round apart itself; across nodes only this helps (docs/restarts.md).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# Python output reaches the log as it happens (the tests and `tail -f` wait on log lines).
export PYTHONUNBUFFERED=1

# Names and interfaces, checked on each node before its part of a multi-node job starts (slurm_task.sh,
# multinode.sh): what would otherwise surface as a resolver traceback in torchrun, a c10d retry loop, or
# gloo listening on 127.0.1.1 and every other node hanging in connectFullMesh. One line on stderr names the
# node, the name or interface, and what to set; returns 1.
#   $1  the rendezvous / master host          $2  the number of nodes (a torchrun MIN:MAX range is fine)
# GLOO_SOCKET_IFNAME (comma-separated interface names, all must exist) and NCCL_SOCKET_IFNAME (NCCL's
# syntax: prefixes, =exact, ^excluded; one must match) are passed through to the workers unchanged; they
# are only checked here.
check_node_network() {
  local host=$1 nnodes=${2:-1} node=${SLURMD_NODENAME:-$(hostname)} have name addrs
  # /proc/net/dev: this network namespace's interfaces (/sys/class/net shows those of whoever mounted /sys)
  have=$(awk -F: 'NR > 2 { gsub(/ /, "", $1); print $1 }' /proc/net/dev | sort | paste -sd' ')
  if ! getent ahosts "$host" >/dev/null; then
    echo "$node: cannot resolve '$host', the rendezvous host of this job: add it to DNS or /etc/hosts on" \
         "every node, or give its address instead (RDZV_HOST for slurm.sbatch, MASTER_ADDR for" \
         "slurm_srun.sbatch, --endpoint for multinode.sh)" >&2
    return 1
  fi
  local gloo=${GLOO_SOCKET_IFNAME:-}
  for name in ${gloo//,/ }; do
    if [[ " $have " != *" $name "* ]]; then
      echo "$node: GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME names '$name', which this node does not have" \
           "(it has: $have); set it to interfaces that every node has" >&2
      return 1
    fi
  done
  if [[ -n ${NCCL_SOCKET_IFNAME:-} ]] && ! nccl_ifname_matches "$NCCL_SOCKET_IFNAME" $have; then
    echo "$node: NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME matches none of this node's interfaces ($have)" >&2
    return 1
  fi
  # gloo without GLOO_SOCKET_IFNAME listens on the address its own host name resolves to
  if [[ -z ${GLOO_SOCKET_IFNAME:-} && $nnodes != 1 && $nnodes != 1:1 && ! $host =~ ^(localhost|127\.|::1$) ]]; then
    name=$(hostname)
    addrs=$(getent ahosts "$name" | awk '{print $1}' | sort -u | paste -sd' ')
    if ! tr ' ' '\n' <<<"$addrs" | grep -qvE '^(127\.|::1$|$)'; then
      local what="to nothing"; [[ -n $addrs ]] && what="only to loopback ($addrs)"
      echo "$node: its own name '$name' resolves $what: gloo would listen where the other nodes cannot" \
           "connect; fix /etc/hosts or DNS, or set GLOO_SOCKET_IFNAME to this node's network interface" \
           "(it has: $have)" >&2
      return 1
    fi
  fi
}
nccl_ifname_matches() {   # $1 = NCCL_SOCKET_IFNAME, then the interfaces; true if NCCL would find one
  local spec=$1 item iface exact=; shift
  [[ $spec == ^* ]] && return 0      # an exclusion list selects whatever is left: nothing to check
  [[ $spec == =* ]] && exact=1 spec=${spec#=}   # exact names instead of prefixes
  for item in ${spec//,/ }; do
    for iface; do
      if [[ -n $exact ]]; then [[ $iface == "$item" ]] && return 0
      elif [[ $iface == "$item"* ]]; then return 0; fi
    done
  done
  return 1
}

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
    # A job array's element by ARRAYID_INDEX: one element carries the array's own job id, and requeueing that
    # plain id requeues every element of the array, finished ones too (seen with reproduce_table.sbatch).
    local job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    job=${job:-$SLURM_JOB_ID}
    # said first: a successful requeue ends this shell at once ("CANCELLED ... DUE TO JOB REQUEUE")
    echo "$(date +%T) requeueing job $job (restarts so far: ${SLURM_RESTART_COUNT:-0})"
    scontrol requeue "$job" ||
      echo "$(date +%T) requeue of job $job failed: resubmit by hand; training resumes from the checkpoint" >&2
  fi
  return "$rc"
}

