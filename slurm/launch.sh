#!/usr/bin/env bash
# The launcher behind slurm/8b.sbatch and slurm/70b.sbatch, which `exec` it (so Slurm's B: signals
# reach this shell):   launch.sh SBATCH_FILE PRESET_OVERRIDE... -- USER_OVERRIDE...
# It keeps what must be shell (site env, srun, the signal trap); `python -m ellama_megatron.launch`
# decides the rest (ellama_megatron/launch/slurm.py: ranks, time left, config, requeue or not).
# On USR1 (time limit, `#SBATCH --signal=B:USR1@...`) or TERM (preemption) the job steps get SIGTERM,
# on which Megatron's --exit-signal-handler saves a checkpoint and exits; then the job is requeued.
# Megatron's own exits: 16 (a rejected loss/gradient reproduced on this GPU) is requeued excluding
# the node, 17 (the result was diagnosed) stops. A failure without a signal (a dead node, a crash, a
# hang the watchdog ended) is requeued while the run makes progress (run/faults.py). A watchdog
# step, one task per node beside the ranks, reads their heartbeats and ends a hang
# (launch/watchdog.py). Every launch's start and end land in ${run_dir}/events.jsonl.
# Environment (all optional; docs/slurm.md): ELLAMA_DRY_RUN=1 (print the plan, start nothing; works
# outside Slurm), ELLAMA_SITE_ENV (default slurm/site.env), ELLAMA_CONTAINER_IMAGE/_MOUNTS, ELLAMA_VENV,
# ELLAMA_PYTHON, ELLAMA_EXIT_MARGIN_MIN (10), ELLAMA_MAX_REQUEUES (500), ELLAMA_MAX_RERUNS_ELSEWHERE (3),
# ELLAMA_LOG_ROOT (slurm/logs), ELLAMA_MASTER_PORT.
set -uo pipefail
SBATCH_FILE="$1"; shift
PRESET=()
while [[ $# -gt 0 && "$1" != "--" ]]; do PRESET+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
log() { echo "[launch $(date +%H:%M:%S)] $*"; }

SITE_ENV="${ELLAMA_SITE_ENV:-$REPO/slurm/site.env}"  # first, so that it can set ELLAMA_* too
# shellcheck disable=SC1090
[[ -f "$SITE_ENV" ]] && source "$SITE_ENV"
VENV="${ELLAMA_VENV:-$REPO/.venv}"
# shellcheck disable=SC1091
[[ -z "${ELLAMA_CONTAINER_IMAGE:-}" && -f "$VENV/bin/activate" ]] && source "$VENV/bin/activate"
PYTHON="${ELLAMA_PYTHON:-python}"
export ELLAMA_LOG_ROOT="${ELLAMA_LOG_ROOT:-$REPO/slurm/logs}"

if [[ -n "${ELLAMA_DRY_RUN:-}" ]]; then
    LAYOUT="$("$PYTHON" -m ellama_megatron.launch layout "$SBATCH_FILE")" || exit 2
    log "dry run: ${LAYOUT}; nothing is started"
    # shellcheck disable=SC2086
    exec "$PYTHON" tools/plan.py "${PRESET[@]}" $LAYOUT "$@"
fi

VARIABLES="$("$PYTHON" -m ellama_megatron.launch prepare "$SBATCH_FILE" "${PRESET[@]}" -- "$@")" || exit 2
eval "$VARIABLES"  # ELLAMA_CONFIG RUN_DIR NODES PROCS_PER_NODE JOB_LOG_DIR START_ITER LAUNCH_ID HEARTBEAT_DIR RANK_STDERR [HANG_DETECTION] [FINISHED]
[[ -n "${FINISHED:-}" ]] && { log "run already finished: nothing to start"; exit 0; }

# One run per folder: `prepare` held ${RUN_DIR}/run.lock while it wrote the config; this shell holds
# it from here until the ranks are gone (the kernel releases it if the job dies), so a second job on
# the same run folder is refused instead of training beside this one.
exec 9>>"$RUN_DIR/run.lock"
if ! flock -n 9; then
    log "error: $RUN_DIR/run.lock: run folder in use by another launch ($(cat "$RUN_DIR/run.lock")); not starting, not requeueing"
    exit 5
fi
echo "host=$(hostname) pid=$$ start=$(date +%Y-%m-%dT%H:%M:%S%z) job=${SLURM_JOB_ID}" >"$RUN_DIR/run.lock"

# Rendezvous on the allocation's first host, at a port from the job id (stable across requeues; not
# the submitter's MASTER_PORT, which sbatch exports and which may be taken).
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)"
export MASTER_ADDR MASTER_PORT="${ELLAMA_MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
# Megatron overlaps TP communication only with one CUDA work queue; NCCL defaults a site may override.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}" NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}" NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-10}" PYTHONUNBUFFERED=1
# The launch's id (its events, timeline and failure records) and the node-local heartbeat folder.
export ELLAMA_LAUNCH_ID="$LAUNCH_ID" ELLAMA_HEARTBEAT_DIR="$HEARTBEAT_DIR"

SRUN=(srun --nodes="$NODES" --ntasks-per-node="$PROCS_PER_NODE" --kill-on-bad-exit=1)
if [[ -n "${ELLAMA_CONTAINER_IMAGE:-}" ]]; then
    SRUN+=(--container-image="$ELLAMA_CONTAINER_IMAGE" --container-workdir="$REPO"
        --container-mounts="$REPO:$REPO${ELLAMA_CONTAINER_MOUNTS:+,$ELLAMA_CONTAINER_MOUNTS}")
fi

SIGNALLED=""
on_signal() {
    [[ -n "$SIGNALLED" ]] && return
    SIGNALLED="$1"
    log "got SIG$1: asking the ranks to checkpoint and exit (SIGTERM to the job steps)"
    scancel --signal=TERM "$SLURM_JOB_ID" || true  # the steps only, not this shell
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

WATCHDOG_PID=""
if [[ -n "${HANG_DETECTION:-}" ]]; then
    # One task per node, sharing the ranks' allocation (--overlap); it ends when its node's ranks do.
    srun --overlap --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=0 \
        "$PYTHON" -m ellama_megatron.launch watchdog "$ELLAMA_CONFIG" "$PROCS_PER_NODE" &
    WATCHDOG_PID=$!
fi
log "starting ${NODES}x${PROCS_PER_NODE} ranks from checkpoint iteration ${START_ITER}, master ${MASTER_ADDR}:${MASTER_PORT}"
# The ranks' stderr (tracebacks, NCCL errors) and srun's own ("task 3: Killed") also go to
# RANK_STDERR: end-job reads the failure from there.
"${SRUN[@]}" "$PYTHON" -m ellama_megatron.engine.train --config "$ELLAMA_CONFIG" 2> >(tee -a "$RANK_STDERR" >&2) &
SRUN_PID=$!
while true; do  # `wait` returns early when a trapped signal arrives; wait until srun itself is gone
    wait "$SRUN_PID"
    RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
# The ranks are gone: a signal now (the SIGTERM of end-job's own requeue) has nothing to ask of them.
trap '' USR1 TERM
if [[ -n "$WATCHDOG_PID" ]]; then
    kill "$WATCHDOG_PID" 2>/dev/null
    wait "$WATCHDOG_PID" 2>/dev/null
fi
"$PYTHON" -m ellama_megatron.launch end-job "$ELLAMA_CONFIG" "$SIGNALLED" "$RC" "$START_ITER" "$JOB_LOG_DIR"
exit $?
