#!/usr/bin/env bash
# Runs every check of the project: formatting, clippy and the whole test suite
# against one control plane shared by all test binaries.
#
# Usage: hack/test.sh [cargo test arguments...]
# Example: hack/test.sh -- --nocapture connection
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cluster_dir=$repo/.tmp/ci-cluster
cluster_started=0
started_ms=$(date +%s%3N)
timings=()

log() { printf '\ntest.sh: %s\n' "$*" >&2; }

now_ms() { date +%s%3N; }

format_duration() {
  local name=$1 elapsed_ms=$2
  printf '%-20s %4d.%ds' "$name" $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100))
}

# Runs a command as a named step and records how long it took. Bash turns
# off errexit inside the command because it is part of an || list, so the
# functions below return their failures explicitly.
step() {
  local name=$1 start status=0
  shift
  log "$name"
  start=$(now_ms)
  "$@" || status=$?
  timings+=("$(format_duration "$name" $(($(now_ms) - start)))")
  return "$status"
}

print_timings() {
  local line
  log "timings"
  for line in "${timings[@]}"; do
    printf '  %s\n' "$line" >&2
  done
  printf '  %s\n' "$(format_duration total $(($(now_ms) - started_ms)))" >&2
}

finish() {
  local status=$?
  local keep_logs=0
  [ "$status" -eq 0 ] || keep_logs=1
  if [ "$cluster_started" = 1 ]; then
    KCO_KEEP_CLUSTER_LOGS=$keep_logs step "stop control plane" bash hack/control-plane.sh down "$cluster_dir" || true
  fi
  print_timings
  if [ "$status" -ne 0 ]; then
    log "failed with exit status $status"
    [ -d .tmp/operator-logs ] && log "logs of the processes that tests started are in .tmp/operator-logs"
    [ -d "$cluster_dir/logs" ] && log "control plane logs are in $cluster_dir/logs"
  fi
  exit "$status"
}
trap finish EXIT

build_tools() {
  local bin
  bin=$(bash hack/tools.sh) || return
  export KCO_TOOLS_BIN=$bin
}

start_control_plane() {
  cluster_started=1
  bash hack/control-plane.sh up "$cluster_dir" --watch-pid $$ || return
  export KCO_TEST_KUBECONFIG=$cluster_dir/kubeconfig
}

# Compiled crates are cached outside the checkout, one directory per Rust
# toolchain, so a fresh clone reuses them; CARGO_TARGET_DIR overrides it.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  toolchain=$(rustc -V | tr -c 'A-Za-z0-9.\n' '-')
  export CARGO_TARGET_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/kameleoon-cohort-operator/target-$toolchain
fi
log "compiled crates go to $CARGO_TARGET_DIR"

rm -rf .tmp/operator-logs
step "build tools" build_tools
step "cargo fmt" cargo fmt --all --check
step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
step "build tests" cargo test --workspace --no-run
step "start control plane" start_control_plane
step "cargo test" cargo test --workspace "$@"
# A small run of every part of the benchmark keeps it working; the full run
# is hack/bench.sh (docs/benchmarks.md).
if [ "$#" -eq 0 ]; then
  step "benchmark smoke run" bash hack/bench.sh --smoke
fi
