#!/usr/bin/env bash
# A single-node Slurm cluster on localhost, for the test suite, the demo and for trying slurm/*.sbatch
# on a laptop. Runs as root without systemd; munge and Slurm keep every file (keys, sockets, state,
# spool, logs, pids) under one folder, so nothing in /etc or /var is touched.
# Usually run as `python -m ellama_megatron.testing.slurm COMMAND` (this file ships with the package).
#
#   slurm_local.sh start    install Debian's slurm + munge if absent, start munged, slurmctld, slurmd
#   slurm_local.sh stop     stop the three daemons by pid
#   slurm_local.sh status   exit 0 when all three run and the node answers; print SLURM_CONF
#   slurm_local.sh env      print `export SLURM_CONF=...` (eval it to use sbatch/squeue here)
#
# Environment:
#   ELLAMA_SLURM_DIR   the folder (default /tmp/ellama-slurm)
#   ELLAMA_SLURM_PORT  slurmctld port; slurmd uses the next one (default 6817)
#
# Settings chosen for tests: with cred_expire=10 and sched_interval=2 a requeued job restarts in about
# 12 s instead of about 135 s; proctrack/linuxproc and task/none need no cgroups.
set -euo pipefail

DIR="${ELLAMA_SLURM_DIR:-/tmp/ellama-slurm}"
PORT="${ELLAMA_SLURM_PORT:-6817}"
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge/run/munge.socket"
NODE="$(hostname -s)"
DAEMONS=(munged slurmctld slurmd)

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
    echo "slurm_local.sh: $*" >&2
    exit 1
}

pid_file() {
    case "$1" in
        munged) echo "$DIR/munge/munged.pid" ;;
        slurmctld) echo "$DIR/slurmctld.pid" ;;
        slurmd) echo "$DIR/slurmd.pid" ;;
    esac
}

# A dead daemon whose parent does not reap it stays a zombie: its pid exists but it does nothing.
alive() {
    local pid="$1" state
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ "$state" != "Z" && "$state" != "X" ]]
}

daemon_pid() {
    local f
    f="$(pid_file "$1")"
    [[ -s "$f" ]] && cat "$f" || true
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them (Debian/Ubuntu only)"
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; installing needs root (run as root or install them yourself)"
    echo "installing ${missing[*]} (apt-get --no-install-recommends)"
    # Package lists may be absent in a fresh container.
    if ! apt-cache show slurmctld >/dev/null 2>&1; then
        apt-get update -qq || die "apt-get update failed"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null || die "apt-get install ${missing[*]} failed"
}

write_config() {
    mkdir -p "$DIR/munge/run" "$DIR/state" "$DIR/spool" "$DIR/log"
    # munged refuses sockets in group/world-writable folders and keys readable by others.
    chmod 700 "$DIR/munge"
    chmod 755 "$DIR/munge/run"
    if [[ ! -s "$DIR/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 600 "$DIR/munge/munge.key"
    fi
    local node_line
    node_line="$(slurmd -C | head -1)"
    [[ "$node_line" == NodeName=* ]] || die "slurmd -C did not describe this node: $node_line"
    cat >"$CONF.tmp" <<EOF
# Written by ellama_megatron/testing/slurm_local.sh: a one-node cluster on localhost for tests.
ClusterName=ellama-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MailProg=/bin/true
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MinJobAge=600
KillWait=10
$node_line State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

node_ready() {
    local state
    state="$(SLURM_CONF="$CONF" sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1)" || return 1
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

cmd_status() {
    local d pid ok=0
    for d in "${DAEMONS[@]}"; do
        pid="$(daemon_pid "$d")"
        if alive "$pid"; then
            echo "$d: running (pid $pid)"
        else
            echo "$d: not running"
            ok=1
        fi
    done
    if [[ $ok -eq 0 ]] && node_ready; then
        echo "node $NODE: $(SLURM_CONF="$CONF" sinfo -h -N -n "$NODE" -o %T)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    return 1
}

start_daemon() {
    local d="$1"
    shift
    if alive "$(daemon_pid "$d")"; then
        return 0
    fi
    "$@" || die "$d failed to start; see its log under $DIR"
}

cmd_start() {
    if cmd_status >/dev/null 2>&1; then
        echo "already running"
        cmd_status
        return 0
    fi
    install_packages
    [[ $(id -u) -eq 0 ]] || die "the local cluster runs its daemons as root; run as root"
    write_config
    start_daemon munged munged --force \
        --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$(pid_file munged)" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    start_daemon slurmctld slurmctld -f "$CONF"
    start_daemon slurmd slurmd -f "$CONF" -N "$NODE"
    local i
    for i in $(seq 1 60); do
        if node_ready; then
            cmd_status
            return 0
        fi
        sleep 0.5
    done
    cmd_status || true
    die "node $NODE did not become idle in 30 s; logs: $DIR/log"
}

stop_daemon() {
    local d="$1" pid i
    pid="$(daemon_pid "$d")"
    if ! alive "$pid"; then
        rm -f "$(pid_file "$d")"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        alive "$pid" || break
        sleep 0.2
    done
    if alive "$pid"; then
        echo "$d (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    alive "$pid" && die "$d (pid $pid) is still running"
    rm -f "$(pid_file "$d")"
    echo "$d stopped"
}

cmd_stop() {
    # Cancel what still runs so that slurmd does not leave job processes behind.
    if alive "$(daemon_pid slurmctld)"; then
        SLURM_CONF="$CONF" scancel --full --user="$(id -un)" 2>/dev/null || true
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    -h | --help | help) usage ;;
    *)
        usage
        exit 2
        ;;
esac
