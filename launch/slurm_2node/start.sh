#!/bin/bash
# Start a real two-node SLURM cluster on this one machine (Debian 12, root, no systemd), for the tests:
#
#   this namespace (hostname H)       network + UTS + mount namespace s2n-node1   ... s2n-node2
#   bridge s2n-br 10.77.0.1/24  ----  eth0 10.77.0.11, hostname node1               eth0 10.77.0.12, node2
#   munged (socket in $RUN/munge)     slurmd -N node1 (port 6918)                   slurmd -N node2
#   slurmctld (port 6917)             /etc/hosts = $RUN/node1/hosts (bind mount)    $RUN/node2/hosts
#
# Each node has its own hostname, IP and hosts file, so jobs meet what real nodes have: names to resolve,
# traffic between hosts (over the veths: no default route, no forwarding). Everything lives under $RUN
# (/tmp/slurm2n); /etc/slurm, /run/munge, ports 6817/6818 and the machine's /etc/hosts are not touched, so
# the one-node cluster (launch/slurm_localhost/) can run beside it. A cluster or leftovers from an earlier
# call are torn down first (stop.sh). ~1 s with the packages installed; prints `export SLURM_CONF=...`.
#
# A node's hosts file may be edited while the cluster runs (in place - the bind mount follows the inode,
# so `sed -i`, which replaces the file, would not reach the node): the tests drop a name from it.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUN=/tmp/slurm2n
NET=10.77.0            # a /24 that only the interfaces made here use
CTL_ADDR=$NET.1
BR=s2n-br
NODES=(node1 node2)    # node i (from 1) lives in namespace s2n-node$i at $NET.1$i
trap 'echo "slurm_2node/start.sh failed at line $LINENO; logs in $RUN/log, $RUN/munge; stop.sh cleans up" >&2' ERR
ms() { echo $(( $(date +%s%N) / 1000000 )); }
t0=$(ms)

# 1. packages (iproute2 and util-linux's nsenter/unshare are in Debian's base system)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v nsenter >/dev/null || ! command -v ip >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge iproute2 util-linux >/dev/null
fi
t1=$(ms)
"$HERE/stop.sh" >/dev/null
t2=$(ms)

# 2. network: a bridge here, one veth pair per node namespace; the node's end is called eth0 on every node
ip link add "$BR" type bridge
ip addr add "$CTL_ADDR/24" dev "$BR"
ip link set "$BR" up
for i in "${!NODES[@]}"; do
  n=$((i + 1)); ns=s2n-node$n
  ip netns add "$ns"
  ip link add "s2n-v$n" type veth peer name "s2n-v$n-ns"
  ip link set "s2n-v$n" master "$BR" up
  ip link set "s2n-v$n-ns" netns "$ns"
  ip -n "$ns" link set "s2n-v$n-ns" name eth0
  ip -n "$ns" addr add "$NET.1$n/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up            # down in a new namespace: localhost (torchrun, gloo) would fail
done
for _ in $(seq 50); do                  # bridge ports forward after a moment (state 3 = forwarding)
  ready=1
  for i in "${!NODES[@]}"; do [[ $(cat "/sys/class/net/s2n-v$((i + 1))/brport/state") == 3 ]] || ready=; done
  [[ -n $ready ]] && break; sleep 0.1
done

# 3. state dirs and each node's hosts file: every node resolves every node and the controller
mkdir -p "$RUN"/{etc,state,log,munge}
hosts="127.0.0.1 localhost
::1 localhost ip6-localhost ip6-loopback
$CTL_ADDR $(hostname -s)"
for i in "${!NODES[@]}"; do hosts+=$'\n'"$NET.1$((i + 1)) ${NODES[i]}"; done
for node in "${NODES[@]}"; do
  mkdir -p "$RUN/$node/spool"
  printf '%s\n' "$hosts" > "$RUN/$node/hosts"
done
t3=$(ms)

# 4. munge: a key, socket and daemon of this cluster's own. munged insists on a private key (0400, owned by
# munge) and a socket directory that everyone may traverse (0755).
dd if=/dev/urandom of="$RUN/munge/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$RUN/munge"
chmod 0400 "$RUN/munge/munge.key"
chmod 0755 "$RUN/munge"
# munged keeps every descriptor it inherits: a caller's `flock /tmp/slurm2.lock` would stay locked for as
# long as munged runs, so it gets none beyond stdin/stdout/stderr (the subshell closes the rest first)
(
  for fd in $(ls "/proc/$BASHPID/fd"); do (( fd > 2 )) && eval "exec $fd>&-"; done 2>/dev/null
  exec runuser -u munge -- /usr/sbin/munged --socket="$RUN/munge/munge.socket" --key-file="$RUN/munge/munge.key" \
    --pid-file="$RUN/munge/munged.pid" --log-file="$RUN/munge/munged.log" --seed-file="$RUN/munge/munged.seed"
)
for _ in $(seq 50); do munge -S "$RUN/munge/munge.socket" -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -S "$RUN/munge/munge.socket" -n | unmunge -S "$RUN/munge/munge.socket" >/dev/null
t4=$(ms)

# 5. slurm.conf: the template plus one NodeName line per node (topology from `slurmd -C`)
hw=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//')
lines=
for i in "${!NODES[@]}"; do
  lines+="NodeName=${NODES[i]} NodeAddr=$NET.1$((i + 1)) NodeHostname=${NODES[i]} $hw RealMemory=1000 State=UNKNOWN\n"
done
sed -e "s|@RUN@|$RUN|g" -e "s|@CTL_HOST@|$(hostname -s)|" -e "s|@CTL_ADDR@|$CTL_ADDR|" \
    -e "s|@NODE_LINES@|${lines%\\n}|" "$HERE/slurm.conf.in" > "$RUN/etc/slurm.conf"
export SLURM_CONF=$RUN/etc/slurm.conf

# 6. daemons (each forks into the background and writes its pid file). A slurmd joins its node's network
# namespace with nsenter - not `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup, and slurmd
# then refuses to start - and gets new UTS and mount namespaces for the hostname and the hosts file. Every
# job step it starts inherits all three.
slurmctld
for i in "${!NODES[@]}"; do
  node=${NODES[i]}
  nsenter --net="/run/netns/s2n-node$((i + 1))" -- unshare --uts --mount -- /bin/sh -c \
    "hostname $node && mount --bind $RUN/$node/hosts /etc/hosts && exec slurmd -N $node"
done

# 7. ready when every node is idle; bounded (a client call can hang while munged or slurmctld starts)
want=$(printf '%s=idle ' "${NODES[@]}")
deadline=$((SECONDS + 60))
until [[ $(timeout 5 sinfo -h -N -o '%N=%T' 2>/dev/null | sort | tr '\n' ' ') == "$want" ]]; do
  if (( SECONDS >= deadline )); then
    echo "two-node slurm did not become ready within 60 s" >&2
    timeout 5 sinfo -N -o '%N %T %E' >&2 || true
    tail -n 20 "$RUN"/log/*.log >&2 || true
    exit 1
  fi
  sleep 0.2
done
t5=$(ms)
echo "two-node slurm ready: apt $((t1 - t0)) ms, teardown $((t2 - t1)) ms, network $((t3 - t2)) ms," \
     "munge $((t4 - t3)) ms, daemons->idle $((t5 - t4)) ms, total $((t5 - t0)) ms"
echo "export SLURM_CONF=$SLURM_CONF"
