#!/usr/bin/env bash
# The launcher behind slurm/8b.sbatch and slurm/70b.sbatch (they differ only in their #SBATCH
# header and preset). Called as the batch script itself (they `exec` it, so Slurm's B: signals
# reach this shell):
#
#   launch.sh SBATCH_FILE PRESET_OVERRIDE... -- USER_OVERRIDE...
#
# Flow: validate with `recipes/cpt.py launch=none` (writes ${run_dir}/config.yaml), srun one rank
# per GPU running the engine (its checkpoint helper is started deaf to the signal), and on USR1
# (time limit, `#SBATCH --signal=B:USR1@...`) or TERM (preemption) send SIGTERM to the job steps
# (every process in them): Megatron's --exit-signal-handler listens for SIGTERM
# (megatron.training default exit_signal), saves a checkpoint and exits; then requeue the job,
# which resumes from that checkpoint. A finished run (${run_dir}/done.json) is not requeued; a
# run that fails without a signal is not requeued; a run that exits cleanly without progress is
# not requeued; ELLAMA_MAX_REQUEUES caps the rest.
#
# Environment (all optional):
#   ELLAMA_DRY_RUN=1        print the plan (tools/plan.py) and exit; works outside Slurm too:
#                           ELLAMA_DRY_RUN=1 bash slurm/70b.sbatch
#   ELLAMA_SITE_ENV         file sourced before launching (default slurm/site.env if present;
#                           see slurm/site.env.example: NCCL/IB settings, modules, container)
#   ELLAMA_CONTAINER_IMAGE  run the ranks in this pyxis/enroot image (srun --container-image)
#   ELLAMA_CONTAINER_MOUNTS extra srun --container-mounts (the repository is always mounted)
#   ELLAMA_VENV             virtual environment to activate (default .venv in the repository)
#   ELLAMA_EXIT_MARGIN_MIN  minutes kept free before the time limit (default 10): sets
#                           train.exit_duration_in_mins from the job's time left
#   ELLAMA_MAX_REQUEUES     requeues allowed (default 500: a month of 4-hour slots is ~180)
#   ELLAMA_LOG_ROOT         per-job log folders go to ELLAMA_LOG_ROOT/<job name>-<job id> (default slurm/logs)
set -uo pipefail

SBATCH_FILE="$1"
shift
PRESET=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
    PRESET+=("$1")
    shift
done
[[ "${1:-}" == "--" ]] && shift
USER_OVERRIDES=("$@")

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

log() { echo "[launch $(date +%H:%M:%S)] $*"; }

# Site settings first, so that they can set ELLAMA_* too.
SITE_ENV="${ELLAMA_SITE_ENV:-$REPO/slurm/site.env}"
if [[ -f "$SITE_ENV" ]]; then
    # shellcheck disable=SC1090
    source "$SITE_ENV"
fi

if [[ -z "${ELLAMA_CONTAINER_IMAGE:-}" ]]; then
    VENV="${ELLAMA_VENV:-$REPO/.venv}"
    if [[ -f "$VENV/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    fi
fi
PYTHON="${ELLAMA_PYTHON:-python}"

# Nodes and ranks per node: from the allocation, or from the #SBATCH header outside Slurm.
header_value() { sed -n "s/^#SBATCH --$1=\([0-9]*\).*/\1/p" "$SBATCH_FILE" | head -1; }
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    NODES="${SLURM_JOB_NUM_NODES:-1}"
    PROCS_PER_NODE="${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / NODES ))}"
    PROCS_PER_NODE="${PROCS_PER_NODE%%(*}"  # "8(x60)" form
else
    NODES="$(header_value nodes)"
    PROCS_PER_NODE="$(header_value ntasks-per-node)"
fi
NODES="${NODES:-1}"
PROCS_PER_NODE="${PROCS_PER_NODE:-1}"
LAYOUT=(cluster.nodes="$NODES" cluster.procs_per_node="$PROCS_PER_NODE")

if [[ -n "${ELLAMA_DRY_RUN:-}" ]]; then
    log "dry run: ${NODES} nodes x ${PROCS_PER_NODE} ranks; nothing is started"
    "$PYTHON" tools/plan.py "${PRESET[@]}" "${LAYOUT[@]}" "${USER_OVERRIDES[@]}"
    exit $?
fi

[[ -n "${SLURM_JOB_ID:-}" ]] || { echo "launch.sh: not inside a Slurm job; submit with sbatch (or set ELLAMA_DRY_RUN=1)" >&2; exit 2; }
RESTART="${SLURM_RESTART_COUNT:-0}"

# Stop a little before the time limit by Megatron's own clock, so the checkpoint is written
# before the USR1 signal is even needed.
EXIT_DURATION=()
TIME_LEFT="$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null | head -1)"
if [[ "$TIME_LEFT" =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]]; then
    MINUTES=$(( ${BASH_REMATCH[2]:-0} * 1440 + 10#${BASH_REMATCH[4]:-0} * 60 + 10#${BASH_REMATCH[5]} ))
    MINUTES=$(( MINUTES - ${ELLAMA_EXIT_MARGIN_MIN:-10} ))
    (( MINUTES > 0 )) && EXIT_DURATION=(train.exit_duration_in_mins="$MINUTES")
fi

# Validate, resolve and record the config (run_dir defaults per job so requeues share it).
DEFAULT_RUN=(run_dir="runs/${SLURM_JOB_NAME:-ellama}-${SLURM_JOB_ID}")
for o in "${USER_OVERRIDES[@]}"; do
    [[ "$o" == run_dir=* || "$o" == run_name=* ]] && DEFAULT_RUN=()
done
log "job ${SLURM_JOB_ID} restart ${RESTART}: ${NODES} nodes x ${PROCS_PER_NODE} ranks"
PREPARE_OUT="$("$PYTHON" recipes/cpt.py launch=none "${DEFAULT_RUN[@]}" "${PRESET[@]}" "${LAYOUT[@]}" \
    "${EXIT_DURATION[@]}" "${USER_OVERRIDES[@]}" 2>&1)"
PREPARE_RC=$?
echo "$PREPARE_OUT"
ELLAMA_CONFIG="$(echo "$PREPARE_OUT" | sed -n 's/^ELLAMA_CONFIG=//p' | tail -1)"
if [[ $PREPARE_RC -ne 0 || -z "$ELLAMA_CONFIG" ]]; then
    log "config invalid (recipes/cpt.py exit ${PREPARE_RC}); not starting, not requeueing"
    exit 2
fi
RUN_DIR="$(dirname "$ELLAMA_CONFIG")"
DONE_FILE="$RUN_DIR/done.json"
ITER_FILE="$RUN_DIR/checkpoints/latest_checkpointed_iteration.txt"
saved_iteration() { [[ -s "$ITER_FILE" ]] && tr -dc '0-9' <"$ITER_FILE" || echo 0; }
# The engine writes done.json at the end; the saved iteration reaching the budget also counts
# (a run killed between its last save and done.json must not train again).
TRAIN_ITERS="$("$PYTHON" -c "import sys; from omegaconf import OmegaConf; from ellama_megatron.engine.megatron_args import train_iterations; print(train_iterations(OmegaConf.load(sys.argv[1])))" "$ELLAMA_CONFIG")"
finished() { [[ -f "$DONE_FILE" ]] || (( $(saved_iteration) >= ${TRAIN_ITERS:-999999999} )); }

JOB_LOG_DIR="${ELLAMA_LOG_ROOT:-$REPO/slurm/logs}/${SLURM_JOB_NAME:-ellama}-${SLURM_JOB_ID}"
mkdir -p "$JOB_LOG_DIR"
cp "$ELLAMA_CONFIG" "$JOB_LOG_DIR/config.restart${RESTART}.yaml"
echo "$RUN_DIR" >"$JOB_LOG_DIR/run_dir"

if finished; then
    log "run already finished (iteration $(saved_iteration) of ${TRAIN_ITERS}); nothing to do"
    exit 0
fi

# Rendezvous: the first host of the allocation, a port derived from the job id (stable across requeues).
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)"
export MASTER_ADDR
# From the job id, not from the environment: sbatch exports the submitter's environment, whose
# MASTER_PORT (a torchrun shell, a test process) may be taken. ELLAMA_MASTER_PORT overrides it.
export MASTER_PORT="${ELLAMA_MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
# Megatron overlaps TP communication only with one CUDA work queue; NCCL defaults a site may override.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-10}"
export PYTHONUNBUFFERED=1

SRUN=(srun --nodes="$NODES" --ntasks-per-node="$PROCS_PER_NODE" --kill-on-bad-exit=1)
if [[ -n "${ELLAMA_CONTAINER_IMAGE:-}" ]]; then
    SRUN+=(--container-image="$ELLAMA_CONTAINER_IMAGE" --container-workdir="$REPO"
        --container-mounts="$REPO:$REPO${ELLAMA_CONTAINER_MOUNTS:+,$ELLAMA_CONTAINER_MOUNTS}")
fi

SIGNALLED=""
on_signal() {
    local sig="$1"
    [[ -n "$SIGNALLED" ]] && return
    SIGNALLED="$sig"
    log "got SIG${sig}: asking the ranks to checkpoint and exit (SIGTERM to the job steps)"
    # Job steps only, not this shell: Megatron's --exit-signal-handler listens for SIGTERM.
    scancel --signal=TERM "$SLURM_JOB_ID" || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

START_ITER="$(saved_iteration)"
log "starting ${NODES}x${PROCS_PER_NODE} ranks from checkpoint iteration ${START_ITER}, master ${MASTER_ADDR}:${MASTER_PORT}"
"${SRUN[@]}" "$PYTHON" -m ellama_megatron.engine.train --config "$ELLAMA_CONFIG" &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives; keep waiting until srun itself is gone.
while true; do
    wait "$SRUN_PID"
    RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
END_ITER="$(saved_iteration)"
log "ranks exited with ${RC}; checkpoint iteration ${START_ITER} -> ${END_ITER}"

if finished; then
    log "run finished (iteration ${END_ITER} of ${TRAIN_ITERS}): not requeueing"
    exit 0
fi
if [[ -z "$SIGNALLED" && $RC -ne 0 ]]; then
    log "ranks failed (exit ${RC}) without a preemption or time-limit signal: not requeueing"
    exit "$RC"
fi
if [[ -z "$SIGNALLED" ]] && (( END_ITER <= START_ITER )); then
    log "ranks exited cleanly but made no progress: not requeueing (would loop)"
    exit 3
fi
if (( RESTART >= ${ELLAMA_MAX_REQUEUES:-500} )); then
    log "requeue cap ELLAMA_MAX_REQUEUES=${ELLAMA_MAX_REQUEUES:-500} reached: not requeueing"
    exit 4
fi
log "requeueing job ${SLURM_JOB_ID} (restart $(( RESTART + 1 ))) to resume from iteration ${END_ITER}"
echo "restart ${RESTART}: ${START_ITER} -> ${END_ITER}, signal ${SIGNALLED:-none}, exit ${RC}" >>"$JOB_LOG_DIR/requeues.txt"
scontrol requeue "$SLURM_JOB_ID"
exit 0
