# shellcheck shell=bash
# Helpers sourced by the launch scripts (bash 3.2+, so macOS's /bin/bash can drive a TPU pod).
# Nothing here runs on its own.

DRY_RUN=${DRY_RUN:-0}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

warn() {
  printf 'warning: %s\n' "$*" >&2
}

# shquote WORD: WORD as one shell word; left bare when nothing in it is special to a shell.
shquote() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$'
  local rest=$1 out=''
  if [[ $rest =~ $safe ]]; then
    printf '%s' "$rest"
    return
  fi
  while [[ $rest == *\'* ]]; do  # each ' becomes '\'' (close, escaped quote, reopen)
    out+="${rest%%\'*}'\\''"
    rest=${rest#*\'}
  done
  printf "'%s'" "$out$rest"
}

# quote_cmd ARG...: the command line that runs ARG... unchanged when pasted into a shell.
quote_cmd() {
  local out='' word
  for word in "$@"; do
    out+="${out:+ }$(shquote "$word")"
  done
  printf '%s' "$out"
}

# note TEXT: a comment in the dry-run plan (stdout), or progress on stderr when running.
note() {
  if ((DRY_RUN)); then
    printf '# %s\n' "$*"
  else
    printf '[launch] %s\n' "$*" >&2
  fi
}

# run ARG...: print the command (--dry-run) or echo it to stderr and run it.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

# run_logged FILE ARG...: like run, with stdout and stderr also appended to FILE.
run_logged() {
  local file=$1
  shift
  if ((DRY_RUN)); then
    printf '%s 2>&1 | tee -a %s\n' "$(quote_cmd "$@")" "$(shquote "$file")"
  else
    mkdir -p "$(dirname "$file")"
    printf '+ %s 2>&1 | tee -a %s\n' "$(quote_cmd "$@")" "$(shquote "$file")" >&2
    "$@" 2>&1 | tee -a "$file"  # pipefail: the command's failure is the pipeline's
  fi
}

# need_value OPTION [VALUE...]: fails unless OPTION was given a value.
need_value() {
  (($# >= 2)) || die "$1 needs a value (see --help)"
}

# config_override KEY=VALUE: the slr_jax.main flag --config.KEY=VALUE ('config.' prefix optional).
config_override() {
  local kv=${1#config.} key_re='^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*='
  [[ $kv =~ $key_re ]] ||
    die "--set expects KEY=VALUE with a dotted config key, e.g. --set train.batch_size=64 (got '$1')"
  printf -- '--config.%s' "$kv"
}

# env_assignment KEY=VALUE: checks an environment assignment and prints it back.
env_assignment() {
  local name_re='^[A-Za-z_][A-Za-z0-9_]*='
  [[ $1 =~ $name_re ]] || die "--env expects NAME=VALUE, e.g. --env TF_CPP_MIN_LOG_LEVEL=2 (got '$1')"
  printf '%s' "$1"
}

# positive_int NAME VALUE
positive_int() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer (got '$2')"
}

# absolute_local PATH: a relative local PATH made absolute (the scripts cd to the repository);
# gs://... and absolute paths come back unchanged.
absolute_local() {
  case $1 in
    gs://* | /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "${1#./}" ;;
  esac
}
