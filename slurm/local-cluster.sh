#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for tests: munged, slurmctld and two slurmd
# daemons (n1, n2), each node in its own UTS+mount namespace so it has its own hostname.
#
#   slurm/local-cluster.sh start    install Debian's SLURM packages if missing, start everything
#   slurm/local-cluster.sh status   exit 0 when every daemon runs and both nodes are up
#   slurm/local-cluster.sh stop     cancel jobs, stop the daemons this script started
#   slurm/local-cluster.sh env      print `export SLURM_CONF=...` for eval in a shell
#
# Everything lives under $FTL_SLURM_ROOT (default /tmp/ftl-slurm): config, munge key and socket,
# spool, logs, pid files. Client commands need SLURM_CONF=$ROOT/etc/slurm.conf; $ROOT/env holds
# that line for scripts and tests. Nothing outside ROOT is written (the real /etc/hosts included:
# each node bind-mounts ROOT/etc/hosts inside its private mount namespace), and stop signals only
# processes this script started: the daemons by their pid files, then whatever is left in the
# namespaces of its own slurmd (job steps), never processes chosen by name.
set -euo pipefail

ROOT=${FTL_SLURM_ROOT:-/tmp/ftl-slurm}
NODES=(n1 n2)
CTLD_PORT=${FTL_SLURM_PORT:-16817}
PARTITION=debug

conf=$ROOT/etc/slurm.conf
run=$ROOT/run
export SLURM_CONF=$conf

log() { echo "local-cluster: $*" >&2; }

alive() {  # alive PIDFILE: the process recorded there is running
    local pid
    [[ -s $1 ]] && pid=$(<"$1") && [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "timed out waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

install_packages() {
    local missing=()
    for cmd in munged slurmctld slurmd sbatch; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    # The packages start their services when installed; a policy-rc.d that says no keeps them off.
    local policy=/usr/sbin/policy-rc.d ours=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && ours=1
    fi
    local rc=0
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge; } >&2 || rc=$?
    ((ours)) && rm -f "$policy"
    return "$rc"
}

write_config() {
    local cpus host i node
    cpus=$(nproc)
    host=$(hostname -s)
    mkdir -p "$ROOT"/{etc,log,munge} "$run" "$ROOT/spool/ctld"
    chmod 700 "$ROOT" "$ROOT/munge"
    for node in "${NODES[@]}"; do mkdir -p "$ROOT/spool/$node"; done
    dd if=/dev/urandom of="$ROOT/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$ROOT/munge/munge.key"

    cp /etc/hosts "$ROOT/etc/hosts"
    for i in "${!NODES[@]}"; do echo "127.0.0.$((11 + i)) ${NODES[i]}" >>"$ROOT/etc/hosts"; done

    cat >"$conf" <<EOF
# Written by slurm/local-cluster.sh: a throwaway test cluster, everything under $ROOT.
ClusterName=ftl-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$run/munge.sock,cred_expire=5
StateSaveLocation=$ROOT/spool/ctld
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
KillWait=10
MinJobAge=600
EOF
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[i]} NodeAddr=127.0.0.$((11 + i)) Port=$((17001 + i)) CPUs=$cpus RealMemory=8000 State=UNKNOWN" >>"$conf"
    done
    local IFS=,
    echo "PartitionName=$PARTITION Nodes=${NODES[*]} Default=YES MaxTime=INFINITE State=UP" >>"$conf"
    echo "export SLURM_CONF=$conf" >"$ROOT/env"
}

start_node() {
    local node=$1
    # A private mount + UTS namespace: this node's hostname, and an /etc/hosts that names both
    # nodes, without touching the real one. slurmd forks away and writes its pid file.
    FTL_NODE_HOSTS="$ROOT/etc/hosts" FTL_NODE=$node \
        unshare --mount --uts --propagation private \
        sh -c 'mount --bind "$FTL_NODE_HOSTS" /etc/hosts && hostname "$FTL_NODE" && exec slurmd -N "$FTL_NODE"' \
        </dev/null >>"$ROOT/log/start.log" 2>&1
    wait_for 20 "slurmd $node" alive "$run/slurmd-$node.pid"
    # Remember the namespace: job steps on this node live in it, and stop cleans up only there.
    readlink "/proc/$(<"$run/slurmd-$node.pid")/ns/uts" >"$run/slurmd-$node.uts"
}

nodes_up() {
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    local node
    for node in "${NODES[@]}"; do grep -Eq "^$node (idle|mix|alloc)" <<<"$states" || return 1; done
}

cmd_start() {
    if alive "$run/slurmctld.pid"; then
        log "already running (SLURM_CONF=$conf)"
        cmd_status
        return
    fi
    install_packages
    cmd_stop_quiet
    rm -rf "${ROOT:?}"/{etc,log,munge,run,spool,env}
    write_config
    : >"$ROOT/log/start.log"
    munged --key-file="$ROOT/munge/munge.key" --socket="$run/munge.sock" --pid-file="$run/munged.pid" \
        --log-file="$ROOT/log/munged.log" --seed-file="$ROOT/munge/munge.seed" --force \
        >>"$ROOT/log/start.log" 2>&1
    wait_for 10 munged alive "$run/munged.pid"
    slurmctld -i >>"$ROOT/log/start.log" 2>&1
    wait_for 20 slurmctld alive "$run/slurmctld.pid"
    wait_for 20 "slurmctld to answer" scontrol ping >/dev/null
    local node
    for node in "${NODES[@]}"; do start_node "$node"; done
    if ! wait_for 60 "both nodes idle" nodes_up; then
        sinfo -N >&2 || true
        tail -n 20 "$ROOT/log/slurmctld.log" >&2 || true
        return 1
    fi
    log "up: nodes ${NODES[*]} in partition $PARTITION; export SLURM_CONF=$conf (or: source $ROOT/env)"
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME: SIGTERM the recorded process and wait for it
    local file=$1 name=$2 pid
    alive "$file" || return 0
    pid=$(<"$file")
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_for 15 "$name to exit" eval "! kill -0 $pid 2>/dev/null"; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

in_namespace() {  # in_namespace UTS_ID: pids of processes in that UTS namespace
    local dir
    for dir in /proc/[0-9]*; do
        [[ $(readlink "$dir/ns/uts" 2>/dev/null) == "$1" ]] && echo "${dir#/proc/}"
    done
    return 0
}

cmd_stop_quiet() {
    local jobs node ns pids
    if alive "$run/slurmctld.pid"; then
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            wait_for 20 "jobs to end" eval '[[ -z $(squeue -h -o %i 2>/dev/null) ]]' || true
        fi
    fi
    for node in "${NODES[@]}"; do stop_pidfile "$run/slurmd-$node.pid" "slurmd $node"; done
    stop_pidfile "$run/slurmctld.pid" slurmctld
    # Leftover job steps (slurmstepd and its tasks) in our nodes' namespaces; the real host's
    # namespace is never a node's, so nothing else can match.
    local host_ns
    host_ns=$(readlink /proc/self/ns/uts)
    for node in "${NODES[@]}"; do
        [[ -s $run/slurmd-$node.uts ]] || continue
        ns=$(<"$run/slurmd-$node.uts")
        [[ $ns != "$host_ns" ]] || continue
        pids=$(in_namespace "$ns")
        if [[ -n $pids ]]; then
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
            sleep 1
            pids=$(in_namespace "$ns")
            # shellcheck disable=SC2086
            [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
        fi
        rm -f "$run/slurmd-$node.uts"
    done
    stop_pidfile "$run/munged.pid" munged
}

cmd_stop() {
    if [[ ! -d $run ]]; then
        log "not running (no $run)"
        return 0
    fi
    cmd_stop_quiet
    log "stopped"
}

cmd_status() {
    local ok=0 name file files=("$run/munged.pid" "$run/slurmctld.pid")
    for name in "${NODES[@]}"; do files+=("$run/slurmd-$name.pid"); done
    for file in "${files[@]}"; do
        name=$(basename "$file" .pid)
        if alive "$file"; then
            echo "$name: running (pid $(<"$file"))"
        else
            echo "$name: stopped"
            ok=1
        fi
    done
    if ((ok == 0)); then
        sinfo -N -o '%N %P %t %C' || ok=1
        nodes_up || ok=1
        echo "SLURM_CONF=$conf"
    fi
    return "$ok"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cat "$ROOT/env" ;;
    *)
        echo "usage: $0 start|stop|status|env" >&2
        exit 2
        ;;
esac
