#!/bin/bash
# Tear down what start.sh made: jobs, slurmctld and the slurmd, whatever still runs in a node namespace,
# munged, the namespaces, veths and bridge, and /tmp/slurm2n. Safe when nothing (or only part) is up; ends
# processes only by pid (pid files, `ip netns pids`). ~4 s when the cluster was up, ~0.1 s when not.
RUN=/tmp/slurm2n
BR=s2n-br
export SLURM_CONF=$RUN/etc/slurm.conf
t0=$(date +%s%N)
any_alive() { local p; for p; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
stop_pids() {   # SIGTERM, up to 5 s, then SIGKILL
  [[ -z $* ]] && return
  kill "$@" 2>/dev/null
  for _ in $(seq 50); do any_alive "$@" || return 0; sleep 0.1; done
  kill -KILL "$@" 2>/dev/null
}
namespaces=$(ls /run/netns 2>/dev/null | grep '^s2n-node')

# 1. jobs first: `scontrol shutdown` leaves running steps (slurmstepd and the tasks) behind. Only while
# slurmctld lives: without it every client command waits ~2 s for an answer.
ctld=$(cat "$RUN/slurmctld.pid" 2>/dev/null)
if [[ -n $ctld ]] && kill -0 "$ctld" 2>/dev/null; then
  if timeout 5 squeue -h >/dev/null 2>&1; then
    scancel --user=root 2>/dev/null
    for _ in $(seq 150); do [[ -z $(timeout 5 squeue -h 2>/dev/null) ]] && break; sleep 0.2; done   # <= 30 s
  fi
  timeout 10 scontrol shutdown >/dev/null 2>&1            # slurmctld and every slurmd
fi

# 2. the daemons by their pid files, then anything left in a node namespace (an orphaned step)
daemons=$(cat "$RUN"/slurmctld.pid "$RUN"/node*/slurmd.pid 2>/dev/null)
for _ in $(seq 100); do any_alive $daemons || break; sleep 0.1; done
stop_pids $(for p in $daemons; do kill -0 "$p" 2>/dev/null && echo "$p"; done)
for ns in $namespaces; do stop_pids $(ip netns pids "$ns" 2>/dev/null); done
[[ -f $RUN/munge/munged.pid ]] && stop_pids "$(cat "$RUN/munge/munged.pid")"   # ours only; ~2 s to exit

# 3. network: deleting a namespace deletes its end of the veth pair, and so the pair
for ns in $namespaces; do ip netns del "$ns"; done
for v in $(ls /sys/class/net | grep '^s2n-v'); do ip link del "$v" 2>/dev/null; done
ip link show "$BR" >/dev/null 2>&1 && ip link del "$BR"
# `ip netns add` made /run/netns a mount point of its own; undo that once no namespace is left
if [[ -d /run/netns && -z $(ls -A /run/netns) ]]; then
  mountpoint -q /run/netns && umount /run/netns
  rmdir /run/netns
fi

rm -rf "$RUN"
echo "two-node slurm stopped in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
true
