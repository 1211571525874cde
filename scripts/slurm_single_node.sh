#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (slurmctld and slurmd on localhost, munge for auth),
# for the Slurm launcher's tests and for trying `promptalign benchmark --launcher slurm`.
#
#   scripts/slurm_single_node.sh start [--install]   # as root; --install: apt-get the packages
#   scripts/slurm_single_node.sh stop
#   scripts/slurm_single_node.sh status
#
# It writes /etc/slurm/slurm.conf (refusing to replace one it did not write), starts munged as the
# munge user and slurmctld + slurmd as root, and waits until the node takes jobs. Exit status 0
# when the cluster runs; otherwise the last line says why (not root, packages missing, ...).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by promptalign scripts/slurm_single_node.sh"
STATE=/var/spool/promptalign-slurm
ACTION=${1:-start}
INSTALL=0
[[ ${2:-} == --install || ${1:-} == --install ]] && INSTALL=1
[[ $ACTION == --install ]] && ACTION=start

die() { echo "slurm_single_node: $*" >&2; exit 1; }

node_ready() {
  local state
  state=$(timeout 10 sinfo -h -N -o %t 2>/dev/null | head -1 || true)
  [[ $state == idle* || $state == mix* || $state == alloc* ]]
}

stop() {
  for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    if [[ -f $f ]]; then kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; fi
  done
}

case $ACTION in
  status)
    if node_ready; then sinfo; exit 0; else echo "slurm_single_node: not running" >&2; exit 1; fi
    ;;
  stop)
    stop
    exit 0
    ;;
  start) ;;
  *) die "unknown action '$ACTION' (start, stop or status)" ;;
esac

[[ $(id -u) == 0 ]] || die "must run as root (it starts slurmctld and slurmd)"
have() { command -v "$1" >/dev/null || [[ -x /usr/sbin/$1 ]]; }
if ! have slurmctld || ! have slurmd || ! have munged; then
  if [[ $INSTALL == 1 ]] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq >/dev/null || true
    timeout 600 apt-get install -y -qq slurm-wlm munge >/dev/null \
      || die "apt-get install slurm-wlm munge failed"
  else
    die "slurm-wlm and munge are not installed (apt-get install slurm-wlm munge, or --install)"
  fi
fi
if node_ready; then echo "slurm_single_node: already running"; exit 0; fi

# munge: one key, the daemon as its own user
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null 2>&1 || die "munged did not start"
fi

# slurm.conf: this host as controller and only node, its real CPU count and memory
if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script: not replacing a real cluster's config"
fi
HOST=$(hostname -s)
CPUS=$(nproc --all)
MEM=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
install -d -m 0755 /etc/slurm "$STATE" "$STATE/ctld" "$STATE/d"
cat > "$CONF" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=300
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

stop
slurmctld -c -f "$CONF" || die "slurmctld did not start (see $STATE/slurmctld.log)"
slurmd -f "$CONF" || die "slurmd did not start (see $STATE/slurmd.log)"
for _ in $(seq 60); do
  node_ready && break
  scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  sleep 0.5
done
node_ready || die "the node did not come up (see $STATE/slurmctld.log and $STATE/slurmd.log)"
echo "slurm_single_node: running: partition debug, node $HOST, $CPUS CPUs"
