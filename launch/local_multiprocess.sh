#!/usr/bin/env bash
# N slr_jax processes on this machine, wired together exactly as on a multi-host GPU cluster
# (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), on CPU by default: a way to
# exercise the multi-process path (data split per process, collective checkpoints) without a
# cluster. Each process writes LOG_DIR/process_<i>.log. If one process fails the others are
# stopped; SIGINT/SIGTERM are passed on to every process (they save a checkpoint, then exit).
# `launch/local_multiprocess.sh --help` lists the options.
# on_signal runs from a trap, which shellcheck cannot follow.
# shellcheck disable=SC2317
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh [OPTIONS] [-- EXTRA_MAIN_FLAGS ...]

Options:
  -n, --num-processes N      processes to start (default: 2)
  --devices-per-process K    CPU devices per process (XLA's host device count; default: 1)
  --platform P               JAX_PLATFORMS for the processes; empty: JAX chooses (default: cpu)
  --port PORT                coordinator port on localhost (default: 12355)
  --workdir DIR              training folder shared by the processes (required)
  --config FILE              config file (default: configs/demo.py)
  --set KEY=VALUE            config override, passed as --config.KEY=VALUE; repeatable
  --python PY                Python to run (default: python)
  --module MOD               module to run with -m (default: slr_jax.main)
  --log-dir DIR              per-process logs (default: WORKDIR/process_logs, or
                             $TMPDIR/slr_jax_process_logs when WORKDIR is on gs://)
  --dry-run                  print the commands instead of running them
  -h, --help                 this text
Everything after `--` is appended to each process's command line unchanged.
Example (2 processes x 2 CPU devices, global batch 4 = 1 per device):
  launch/local_multiprocess.sh -n 2 --devices-per-process 2 --workdir /tmp/slr_mp \
    --set train.batch_size=4
EOF
}

NUM=2
DEVICES=1
PLATFORM=cpu
PORT=12355
WORKDIR=''
CONFIG=configs/demo.py
PYTHON=python
MODULE=slr_jax.main
LOG_DIR=''
OVERRIDES=()
EXTRA=()
while (($#)); do
  case $1 in
    --) shift; EXTRA=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
  esac
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -n | --num-processes) need_value "$@"; NUM=$2; shift 2 ;;
    --devices-per-process) need_value "$@"; DEVICES=$2; shift 2 ;;
    --platform) need_value "$@"; PLATFORM=$2; shift 2 ;;
    --port) need_value "$@"; PORT=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --set) need_value "$@"; flag=$(config_override "$2"); OVERRIDES+=("$flag"); shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --module) need_value "$@"; MODULE=$2; shift 2 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n $WORKDIR ]] || die "--workdir DIR is required (a folder all processes share)"
positive_int --num-processes "$NUM"
positive_int --devices-per-process "$DEVICES"
positive_int --port "$PORT"
((PORT < 65536)) || die "--port must be below 65536 (got $PORT)"
WORKDIR=$(absolute_local "$WORKDIR")
[[ $PYTHON != */* ]] || PYTHON=$(absolute_local "$PYTHON")
if [[ -z $LOG_DIR ]]; then
  if [[ $WORKDIR == gs://* ]]; then
    LOG_DIR=${TMPDIR:-/tmp}/slr_jax_process_logs
  else
    LOG_DIR=$WORKDIR/process_logs
  fi
fi
LOG_DIR=$(absolute_local "$LOG_DIR")

xla_flags="--xla_force_host_platform_device_count=$DEVICES"
[[ -z ${XLA_FLAGS:-} ]] || xla_flags="$XLA_FLAGS $xla_flags"
env_vars=("JAX_COORDINATOR_ADDRESS=localhost:$PORT" "JAX_NUM_PROCESSES=$NUM")
[[ -z $PLATFORM ]] || env_vars+=("JAX_PLATFORMS=$PLATFORM")
env_vars+=("XLA_FLAGS=$xla_flags")
job=("$PYTHON" -m "$MODULE" "--config=$CONFIG" "--workdir=$WORKDIR")
job+=(${OVERRIDES[@]+"${OVERRIDES[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})

run cd "$REPO_ROOT"
run mkdir -p "$LOG_DIR"
if ((DRY_RUN)); then
  for ((i = 0; i < NUM; i++)); do
    printf '%s > %s 2>&1 &\n' "$(quote_cmd env "${env_vars[@]}" "JAX_PROCESS_ID=$i" "${job[@]}")" \
      "$(shquote "$LOG_DIR/process_$i.log")"
  done
  echo wait
  exit 0
fi

pids=()
stop_all() {  # SIGTERM to every process still running (background jobs ignore SIGINT)
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    [[ $pid == "done" ]] || kill -TERM "$pid" 2>/dev/null || true
  done
}
# shellcheck disable=SC2329  # invoked by the traps below
on_signal() {  # on_signal NAME NUMBER
  note "SIG$1: sending SIGTERM to the processes, waiting for them to exit"
  stop_all
  wait || true
  exit $((128 + $2))
}
trap 'on_signal INT 2' INT
trap 'on_signal TERM 15' TERM

for ((i = 0; i < NUM; i++)); do
  printf '+ %s > %s 2>&1 &\n' "$(quote_cmd env "${env_vars[@]}" "JAX_PROCESS_ID=$i" "${job[@]}")" \
    "$(shquote "$LOG_DIR/process_$i.log")" >&2
  env "${env_vars[@]}" "JAX_PROCESS_ID=$i" "${job[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
note "$NUM processes started; follow them with: tail -f $LOG_DIR/process_0.log"

# Poll rather than `wait -n`, which macOS's bash 3.2 lacks; the first failure stops the rest.
status=0
remaining=$NUM
while ((remaining > 0)); do
  for ((i = 0; i < NUM; i++)); do
    pid=${pids[i]}
    [[ $pid != "done" ]] || continue
    kill -0 "$pid" 2>/dev/null && continue
    code=0
    wait "$pid" || code=$?
    pids[i]="done"
    remaining=$((remaining - 1))
    if ((code != 0 && status == 0)); then
      status=$code
      note "process $i exited with status $code (log: $LOG_DIR/process_$i.log); stopping the others"
      tail -n 20 "$LOG_DIR/process_$i.log" >&2 || true
      stop_all
    fi
  done
  ((remaining == 0)) || sleep 0.2
done
((status == 0)) && note "all $NUM processes finished; logs in $LOG_DIR"
exit "$status"
