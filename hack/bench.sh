#!/usr/bin/env bash
# Runs the export benchmark (benches/export.rs) on its own control plane,
# with the API server's audit log on so the scale run can count the
# operator's requests, and the peer script's Python packages installed in a
# cached virtual environment. docs/benchmarks.md records the results.
#
# Usage: hack/bench.sh [--smoke] [benchmark options]
#   --smoke   a small, quick run of every part, in the debug profile (the
#             test command runs it); without it the release profile is used.
# Other options go to the benchmark; see the top of benches/export.rs.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cache=${XDG_CACHE_HOME:-$HOME/.cache}/kameleoon-cohort-operator
requests_version=2.34.2
dir=$repo/.tmp/bench

smoke=0
if [ "${1:-}" = "--smoke" ]; then
  smoke=1
  shift
fi

tools=$(bash hack/tools.sh)
export KCO_TOOLS_BIN=$tools

venv=$cache/bench-venv-requests-$requests_version
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import requests" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "requests==$requests_version"
fi
export BENCH_PYTHON=$venv/bin/python

rm -rf "$dir" && mkdir -p "$dir"
export KCO_APISERVER_AUDIT_LOG=$dir/audit.log
bash hack/control-plane.sh up "$dir/cluster" --watch-pid $$ >&2
trap 'bash hack/control-plane.sh down "$dir/cluster" >/dev/null 2>&1 || true' EXIT
export KCO_TEST_KUBECONFIG=$dir/cluster/kubeconfig

if [ "$smoke" = 1 ]; then
  cargo test --bench export -- --sizes 2000 --rate-limited 3000 --scale 40,4 --window 6 \
    --json "$dir/smoke.json" "$@"
else
  cargo bench --bench export -- --json "$dir/results.json" "$@"
fi
