#!/usr/bin/env bash
# Train slr_jax on a Cloud TPU VM or pod slice: create (or reuse) it, copy the code to every
# worker, install, run `python -m slr_jax.main` on all workers at once, read the logs, delete.
# `launch/tpu_pod.sh --help` lists the options; docs/scaling.md walks through a full run.
# The step_* functions are called by name ("step_$step"), which shellcheck cannot follow.
# shellcheck disable=SC2317
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html
REMOTE_TARBALL=slr_jax_code.tar.gz
# Written into the workers' command lines as they are: ~ expands there, not here.
# shellcheck disable=SC2088
REMOTE_LOG='~/slr_jax_train.log'
# shellcheck disable=SC2088
REMOTE_PID='~/slr_jax_train.pid'

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [OPTIONS] STEP [STEP ...] [-- EXTRA_MAIN_FLAGS ...]

Steps, run in the order given:
  preflight
           on this machine: compile every program of the run for --accelerator-type with
           `python -m slr_jax.preflight` (needs jax[tpu], requirements-tpu.txt; no TPU) and
           stop unless each fits the chips' memory; nothing is booked
  create   create the TPU VM / pod slice, or reuse it when it exists, is READY and has the
           requested type (a PREEMPTED or TERMINATED one is deleted and created again)
  copy     copy the code to every worker: a `git archive` of --ref (committed files only),
           or `git clone --repo-url` on the workers
  setup    on every worker: a Python --python-version virtual environment (uv) with
           requirements.txt and jax[tpu] at the jax version pinned there
  train    run `python -m slr_jax.main` on every worker; output streams here and is appended
           to LOG_DIR/NAME.log here and to ~/slr_jax_train.log on each worker
  logs     print the end of ~/slr_jax_train.log of every worker (or --log-worker)
  stop     send SIGTERM to a --detach'ed run on every worker (it saves a checkpoint, exits)
  delete   delete the TPU VM
  all      preflight create copy setup train

Options (environment variable in brackets; options win):
  --name NAME              TPU VM name [SLR_TPU_NAME] (required)
  --zone ZONE              e.g. us-central2-b [SLR_TPU_ZONE] (required)
  --project PROJECT        [SLR_TPU_PROJECT] (default: gcloud's configured project)
  --accelerator-type TYPE  e.g. v4-32, v5litepod-16, v5p-32, v6e-16 [SLR_TPU_TYPE]
                           (required by preflight and create)
  --version VERSION        TPU runtime [SLR_TPU_VERSION] (default from the type:
                           v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot | --preemptible | --reserved
                           provisioning model for create (default: on-demand)
  --create-flag FLAG       extra flag for `gcloud compute tpus tpu-vm create`, repeatable
                           (e.g. --create-flag=--network=my-net)
  --config FILE            config file, relative to the repository [SLR_CONFIG]
                           (default: configs/voc.py)
  --workdir DIR            training folder, gs://BUCKET/PATH on a pod [SLR_WORKDIR]
                           (required by train)
  --set KEY=VALUE          config override, passed as --config.KEY=VALUE; repeatable
  --local-python PYTHON    Python with slr_jax's requirements and requirements-tpu.txt on
                           this machine, for preflight [SLR_LOCAL_PYTHON] (default: python3)
  --env NAME=VALUE         environment variable for the job on every worker; repeatable
  --ref REF                commit, branch or tag to copy (default: HEAD)
  --repo-url URL           clone URL on the workers instead of copying a git archive
  --remote-dir DIR         code folder on the workers, relative to home (default: slr_jax)
  --venv DIR               virtual environment on the workers, relative to home
                           (default: slr_venv)
  --python-version X.Y     Python of that environment (default: 3.11)
  --jax-version V          jax[tpu] version (default: the jax== pin in requirements.txt)
  --detach                 train: start in the background on the workers and return;
                           follow with `logs --follow`, end with `stop`
  --log-dir DIR            local folder for the logs (default: tpu_logs)
  --log-worker W           worker for `logs`: all or an index (default: all)
  --log-lines N            lines per worker for `logs`, or all (default: 100)
  --follow                 logs: keep printing new lines (tail -F)
  --delete-on-exit         delete the TPU VM when this script exits, also after a failure
  --dry-run                print the commands instead of running them (needs no gcloud)
  -h, --help               this text

Everything after `--` is appended to the slr_jax.main command line unchanged.
Example:
  launch/tpu_pod.sh --name slr-v4 --zone us-central2-b --accelerator-type v4-32 \
    --workdir gs://my-bucket/slr/voc --set dataset.data_dir=gs://my-bucket/tfds \
    --set train.batch_size=64 --set model.dtype=bfloat16 all
EOF
}

NAME=${SLR_TPU_NAME:-}
ZONE=${SLR_TPU_ZONE:-}
PROJECT=${SLR_TPU_PROJECT:-}
ACCEL=${SLR_TPU_TYPE:-}
VERSION=${SLR_TPU_VERSION:-}
CONFIG=${SLR_CONFIG:-configs/voc.py}
LOCAL_PYTHON=${SLR_LOCAL_PYTHON:-python3}
WORKDIR=${SLR_WORKDIR:-}
PROVISIONING=''
REF=HEAD
REPO_URL=''
REMOTE_DIR=slr_jax
VENV=slr_venv
PYTHON_VERSION=3.11
JAX_VERSION=''
DETACH=0
LOG_DIR=tpu_logs
LOG_WORKER=all
LOG_LINES=100
FOLLOW=0
DELETE_ON_EXIT=0
STEPS=()
CREATE_FLAGS=()
OVERRIDES=()
ENVS=()
EXTRA=()

set_provisioning() {
  [[ -z $PROVISIONING || $PROVISIONING == "$1" ]] ||
    die "choose one of --spot, --preemptible, --reserved (got $PROVISIONING and $1)"
  PROVISIONING=$1
}

while (($#)); do
  case $1 in
    --) shift; EXTRA=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
  esac
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --detach) DETACH=1; shift ;;
    --follow) FOLLOW=1; shift ;;
    --delete-on-exit) DELETE_ON_EXIT=1; shift ;;
    --spot | --preemptible | --reserved) set_provisioning "$1"; shift ;;
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCEL=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --create-flag) need_value "$@"; CREATE_FLAGS+=("$2"); shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --set) need_value "$@"; flag=$(config_override "$2"); OVERRIDES+=("$flag"); shift 2 ;;
    --local-python) need_value "$@"; LOCAL_PYTHON=$2; shift 2 ;;
    --env) need_value "$@"; assignment=$(env_assignment "$2"); ENVS+=("$assignment"); shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --repo-url) need_value "$@"; REPO_URL=$2; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --python-version) need_value "$@"; PYTHON_VERSION=$2; shift 2 ;;
    --jax-version) need_value "$@"; JAX_VERSION=$2; shift 2 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
    --log-worker) need_value "$@"; LOG_WORKER=$2; shift 2 ;;
    --log-lines) need_value "$@"; LOG_LINES=$2; shift 2 ;;
    preflight | create | copy | setup | train | logs | stop | delete) STEPS+=("$1"); shift ;;
    all) STEPS+=(preflight create copy setup train); shift ;;
    -*) die "unknown option '$1' (see launch/tpu_pod.sh --help)" ;;
    *) die "unknown step '$1'; steps: preflight create copy setup train logs stop delete all" ;;
  esac
done

# ---- checks, all before anything runs --------------------------------------------------------
((${#STEPS[@]})) || die "no step given: add one or more of preflight create copy setup train logs stop delete all (see --help)"
[[ -n $NAME ]] || die "--name NAME (or SLR_TPU_NAME) is required"
[[ -n $ZONE ]] || die "--zone ZONE (or SLR_TPU_ZONE) is required, e.g. --zone us-central2-b"
name_re='^[a-z]([-a-z0-9]*[a-z0-9])?$'
[[ $NAME =~ $name_re ]] ||
  die "--name '$NAME' is not a valid TPU name: lowercase letters, digits and '-', starting with a letter"
rel_re='^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$'
[[ $REMOTE_DIR =~ $rel_re && $REMOTE_DIR != *..* ]] ||
  die "--remote-dir '$REMOTE_DIR' must be a plain path relative to the workers' home, e.g. slr_jax"
[[ $VENV =~ $rel_re && $VENV != *..* ]] ||
  die "--venv '$VENV' must be a plain path relative to the workers' home, e.g. slr_venv"
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.11 (got '$PYTHON_VERSION')"
[[ $LOG_WORKER == all || $LOG_WORKER =~ ^[0-9]+$ ]] ||
  die "--log-worker must be all or a worker index (got '$LOG_WORKER')"
[[ $LOG_LINES == all || $LOG_LINES =~ ^[1-9][0-9]*$ ]] ||
  die "--log-lines must be a positive number or all (got '$LOG_LINES')"

has_step() {
  local s
  for s in "${STEPS[@]}"; do [[ $s == "$1" ]] && return 0; done
  return 1
}

if has_step preflight; then
  [[ -n $ACCEL ]] || die "preflight needs --accelerator-type (or SLR_TPU_TYPE), e.g. v4-32 or v5litepod-16"
  [[ -n $CONFIG ]] || die "--config must not be empty"
fi
if has_step create; then
  [[ -n $ACCEL ]] || die "create needs --accelerator-type (or SLR_TPU_TYPE), e.g. v4-32 or v5litepod-16"
  if [[ -z $VERSION ]]; then
    case $ACCEL in
      v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
      v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) VERSION=v2-alpha-tpuv5 ;;
      v6e-*) VERSION=v2-alpha-tpuv6e ;;
      *) die "no default runtime for accelerator type '$ACCEL': pass --version (list them with: gcloud compute tpus tpu-vm versions list --zone=$ZONE)" ;;
    esac
  fi
fi
if has_step train; then
  [[ -n $WORKDIR ]] ||
    die "train needs --workdir (or SLR_WORKDIR): gs://BUCKET/PATH, which every worker of a pod can reach"
  [[ -n $CONFIG ]] || die "--config must not be empty"
  [[ $WORKDIR == gs://* ]] ||
    warn "--workdir $WORKDIR is not on gs://: only a single-host TPU VM works with a local folder"
  [[ -f $REPO_ROOT/${CONFIG%%:*} || -n $REPO_URL ]] ||
    warn "--config ${CONFIG%%:*} is not a file of $REPO_ROOT; the workers will fail unless the copied code has it"
fi
if [[ -z $REPO_URL ]] && { has_step copy || { has_step setup && [[ -z $JAX_VERSION ]]; }; }; then
  git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
    die "$REPO_ROOT is not a git checkout: copy needs one, or pass --repo-url URL [--ref REF]"
  COMMIT=$(git -C "$REPO_ROOT" rev-parse --verify --quiet "$REF^{commit}") ||
    die "--ref '$REF' is not a commit of $REPO_ROOT (a branch, tag or commit hash is expected)"
fi
if has_step setup && [[ -z $JAX_VERSION ]]; then
  if [[ -n $REPO_URL ]]; then
    requirements=$(cat "$REPO_ROOT/requirements.txt")
  else
    requirements=$(git -C "$REPO_ROOT" show "$COMMIT:requirements.txt")
  fi
  JAX_VERSION=$(printf '%s\n' "$requirements" | sed -n 's/^jax==\([^[:space:];#]*\).*/\1/p')
  JAX_VERSION=${JAX_VERSION%%$'\n'*}
  [[ -n $JAX_VERSION ]] || die "requirements.txt has no 'jax==VERSION' line: pass --jax-version"
fi
((DRY_RUN)) || command -v gcloud >/dev/null ||
  die "gcloud not found: install the Google Cloud CLI, or use --dry-run to see the commands"

# ---- gcloud commands --------------------------------------------------------------------------
LOC=("--zone=$ZONE")
[[ -z $PROJECT ]] || LOC+=("--project=$PROJECT")

tpu_vm() {  # tpu_vm VERB ARG...: gcloud compute tpus tpu-vm VERB ARG... --zone [--project]
  local verb=$1
  shift
  run gcloud compute tpus tpu-vm "$verb" "$@" "${LOC[@]}"
}

on_workers() {  # on_workers WORKER COMMAND: runs the shell COMMAND on worker(s) WORKER
  tpu_vm ssh "$NAME" "--worker=$1" "--command=$2"
}

create_vm() {
  local flags=("--accelerator-type=$ACCEL" "--version=$VERSION")
  [[ -z $PROVISIONING ]] || flags+=("$PROVISIONING")
  tpu_vm create "$NAME" "${flags[@]}" ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}
}

delete_vm() {
  tpu_vm delete "$NAME" --quiet
}

step_preflight() {
  # The run's config overrides: --set, and --config.* flags after `--`.
  local flags=("--config=$CONFIG" "--topology=$ACCEL") word
  flags+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
  for word in ${EXTRA[@]+"${EXTRA[@]}"}; do
    [[ $word != --config.* ]] || flags+=("$word")
  done
  note "preflight: compile the run's programs for $ACCEL on this machine, in $REPO_ROOT (exit 1: they do not fit)"
  (cd "$REPO_ROOT" && run "$LOCAL_PYTHON" -m slr_jax.preflight "${flags[@]}")
}

step_create() {
  local describe=(gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}"
    '--format=value(state,acceleratorType)')
  if ((DRY_RUN)); then
    note "create: look for an existing TPU VM $NAME (state and type)"
    run "${describe[@]}"
    note "none -> create it; READY with type $ACCEL -> reuse it; PREEMPTED/TERMINATED -> delete, then create"
    create_vm
    return
  fi
  local info state type
  info=$("${describe[@]}" 2>/dev/null) || info=''
  state=${info%%$'\t'*}
  type=${info#*$'\t'}
  case $state in
    '') create_vm ;;
    READY)
      [[ $type == "$ACCEL" ]] ||
        die "TPU VM $NAME exists with type $type, not $ACCEL: delete it (step delete) or choose another --name"
      note "reusing TPU VM $NAME ($type, READY)"
      ;;
    PREEMPTED | TERMINATED)
      note "TPU VM $NAME is $state: deleting it and creating it again"
      delete_vm
      create_vm
      ;;
    *) die "TPU VM $NAME is $state: wait until it is READY, or delete it (step delete)" ;;
  esac
}

step_copy() {
  if [[ -n $REPO_URL ]]; then
    local checkout=''
    [[ $REF == HEAD ]] || checkout=" && git -C $REMOTE_DIR checkout --quiet $(shquote "$REF")"
    note "copy: clone $REPO_URL on every worker"
    on_workers all "rm -rf $REMOTE_DIR && git clone --quiet $(shquote "$REPO_URL") $REMOTE_DIR$checkout"
    return
  fi
  if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]] &&
    [[ $COMMIT == "$(git -C "$REPO_ROOT" rev-parse HEAD)" ]]; then
    warn "$REPO_ROOT has uncommitted changes; only commit $COMMIT is copied"
  fi
  local tarball=${TMPDIR:-/tmp}/slr_jax_$NAME.tar.gz
  note "copy: commit $COMMIT to every worker"
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" "$COMMIT"
  tpu_vm scp "$tarball" "$NAME:$REMOTE_TARBALL" --worker=all
  on_workers all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR && rm $REMOTE_TARBALL"
  run rm -f "$tarball"
}

step_setup() {
  note "setup: Python $PYTHON_VERSION environment ~/$VENV with requirements.txt and jax[tpu]==$JAX_VERSION"
  # shellcheck disable=SC2088
  local uv='~/.local/bin/uv'
  on_workers all "python3 -m pip install --user --quiet --upgrade uv && $uv venv --allow-existing --python $PYTHON_VERSION $VENV && $uv pip install --python $VENV/bin/python -r $REMOTE_DIR/requirements.txt $(shquote "jax[tpu]==$JAX_VERSION") --find-links $LIBTPU_INDEX"
}

step_train() {
  # --distributed=on: JAX finds the pod's workers itself (TPU metadata); see docs/scaling.md.
  local flags=(-m slr_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" --distributed=on)
  flags+=(${OVERRIDES[@]+"${OVERRIDES[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})
  local job
  job="env $(quote_cmd PYTHONUNBUFFERED=1 ${ENVS[@]+"${ENVS[@]}"}) ~/$VENV/bin/python $(quote_cmd "${flags[@]}")"
  if ((DETACH)); then
    note "train: start in the background on every worker (logs: step logs; end: step stop)"
    on_workers all "cd $REMOTE_DIR && { nohup $job >> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID; }"
  else
    note "train: on every worker; output also appended to $LOG_DIR/$NAME.log"
    run_logged "$LOG_DIR/$NAME.log" gcloud compute tpus tpu-vm ssh "$NAME" --worker=all \
      "--command=set -o pipefail; cd $REMOTE_DIR && $job 2>&1 | tee -a $REMOTE_LOG" "${LOC[@]}"
  fi
}

step_logs() {
  local lines=$LOG_LINES tail=tail
  [[ $lines != all ]] || lines=+1
  ((!FOLLOW)) || tail='tail -F'
  note "logs: worker(s) $LOG_WORKER, each line prefixed with the worker's host name"
  on_workers "$LOG_WORKER" "$tail -n $lines $REMOTE_LOG | sed -u \"s/^/[\$(hostname)] /\""
}

step_stop() {
  note "stop: SIGTERM to the detached run on every worker (it saves a checkpoint first)"
  on_workers all "kill -TERM \$(cat $REMOTE_PID) && echo \"[\$(hostname)] sent SIGTERM to \$(cat $REMOTE_PID)\""
}

step_delete() {
  note "delete: TPU VM $NAME"
  delete_vm
}

# ---- run ---------------------------------------------------------------------------------------
# shellcheck disable=SC2329  # invoked by the EXIT trap below
delete_on_exit() {
  local exit_status=$?
  delete_vm || warn "could not delete TPU VM $NAME: delete it by hand"
  exit "$exit_status"
}
if ((DELETE_ON_EXIT)) && ((!DRY_RUN)); then
  trap delete_on_exit EXIT
fi
for step in "${STEPS[@]}"; do
  "step_$step"
done
if ((DELETE_ON_EXIT)) && ((DRY_RUN)); then
  note "on exit, also after a failure (--delete-on-exit):"
  delete_vm
fi
