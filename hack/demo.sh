#!/usr/bin/env bash
# Runs the operator end to end on this machine: builds the Kubernetes
# components (once), starts a control plane and the stand-in Mixpanel and
# Kameleoon servers on 127.0.0.1, runs the operator, applies examples/ with
# kubectl and shows what Kameleoon received. Everything stops on exit.
#
# Usage: hack/demo.sh [--keep]   (--keep leaves it running until Ctrl-C)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
dir=$repo/.tmp/demo
keep=0
for arg in "$@"; do
  case $arg in
    --keep) keep=1 ;;
    *)
      echo "demo: unknown argument $arg (the only option is --keep)" >&2
      exit 2
      ;;
  esac
done
pids=()

say() { printf '\n==> %s\n' "$*"; }

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  bash hack/control-plane.sh down "$dir/cluster" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "Building the Kubernetes components (cached after the first run)"
tools=$(bash hack/tools.sh)
export PATH=$tools:$PATH

say "Building the operator and the stand-ins"
cargo build --release --bin kameleoon-cohort-operator -p kameleoon-cohort-operator
# Binaries land in CARGO_TARGET_DIR when it is set, relative to the repository.
bin=${CARGO_TARGET_DIR:-target}/release
cargo build --release -p standins --bin standins

rm -rf "$dir" && mkdir -p "$dir"
say "Starting etcd, kube-apiserver and kube-controller-manager on 127.0.0.1"
bash hack/control-plane.sh up "$dir/cluster" --watch-pid $$
export KUBECONFIG=$dir/cluster/kubeconfig

say "Starting the stand-in Mixpanel and Kameleoon servers"
"$bin/standins" --seed examples/demo/seed.yaml --urls-file "$dir/urls.json" >"$dir/standins.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$dir/urls.json" ] && break; sleep 0.1; done
mixpanel=$(sed -n 's/.*"mixpanel": "\(.*\)".*/\1/p' "$dir/urls.json")
kameleoon=$(sed -n 's/.*"kameleoon": "\(.*\)".*/\1/p' "$dir/urls.json")

say "Installing the CRDs"
kubectl apply -f crds/
# A definition this new may have no conditions yet, and `kubectl wait` fails
# on that instead of waiting, so the loop reads the condition itself.
for crd in kameleoonconnections.cohortsync.io cohortsyncs.cohortsync.io; do
  for attempt in $(seq 120); do
    established=$(kubectl get crd "$crd" \
      -o jsonpath='{.status.conditions[?(@.type=="Established")].status}')
    [ "$established" = True ] && break
    if [ "$attempt" = 120 ]; then
      echo "demo: CRD $crd was not established within 60s" >&2
      exit 1
    fi
    sleep 0.5
  done
done

say "Starting the operator (log: $dir/operator.log)"
"$bin/kameleoon-cohort-operator" run \
  --metrics-address 127.0.0.1:0 --health-address 127.0.0.1:0 \
  --mixpanel-url "$mixpanel" --kameleoon-api-url "$kameleoon" --kameleoon-data-url "$kameleoon" \
  >"$dir/operator.log" 2>&1 &
pids+=($!)

say "kubectl apply -f examples/"
kubectl apply -f examples/

say "Waiting for the connection and the syncs to be Ready"
kubectl wait -n growth --for=condition=Ready kconn/production --timeout=120s
kubectl wait -n growth --for=condition=Ready csync --all --timeout=300s

say "kubectl get kconn,csync -n growth"
kubectl get kconn,csync -n growth -o wide

say "What the Kameleoon stand-in holds, per custom data"
curl -s "$kameleoon/_standin/sites/a1b2c3d4e5/custom-datas" | tr '}' '\n' | sed -n 's/.*"index":\([0-9]*\).*"name":"\([^"]*\)".*/\1 \2/p' |
  while read -r index name; do
    summary=$(curl -s "$kameleoon/_standin/sites/a1b2c3d4e5/custom-datas/$index/summary")
    sample=$(curl -s "$kameleoon/_standin/sites/a1b2c3d4e5/custom-datas/$index/values?kind=visitorCode&limit=3")
    printf '  %s (index %s)\n    counts: %s\n    first visitor codes: %s\n' "$name" "$index" "$summary" "$sample"
  done
say "Data API requests the stand-in received"
curl -s "$kameleoon/_standin/requests?route=events" | grep -o '"line_count":[0-9]*' | sort | uniq -c

if [ "$keep" = 1 ]; then
  say "Running. Ctrl-C, or SIGINT or SIGTERM to this script (PID $$), stops everything."
  echo "  KUBECONFIG=$KUBECONFIG"
  echo "  operator log: $dir/operator.log"
  echo "  Mixpanel stand-in: $mixpanel"
  echo "  Kameleoon stand-in: $kameleoon (what it received: $kameleoon/_standin/requests)"
  echo "  tests/standins/README.md lists the stand-ins' control endpoints."
  wait
fi
