#!/usr/bin/env bash
# Starts and stops a local Kubernetes control plane (etcd, kube-apiserver and
# kube-controller-manager, the release named in hack/versions.env) for the
# tests and the demo. Everything listens on 127.0.0.1 only, on free ports
# picked at start. There is no kubelet or scheduler, so Pods never run.
#
# Usage:
#   hack/control-plane.sh up DIR [--watch-pid PID]
#   hack/control-plane.sh down DIR
#
# `up` writes DIR/kubeconfig (cluster admin), DIR/env and the component logs
# in DIR/logs. DIR/env exports KUBECONFIG, KCO_TEST_KUBECONFIG, KCO_TOOLS_BIN
# and PATH, so `cargo test` run after sourcing it uses this control plane.
# `up` returns once the API server reports ready and the controller manager
# has started. With --watch-pid, a background watchdog runs `down DIR` as soon
# as process PID exits. `down` stops the processes (SIGTERM, then SIGKILL
# after KCO_STOP_TIMEOUT seconds) and removes DIR.
#
# Environment:
#   KCO_TOOLS_BIN           directory with the binaries (default: the output of hack/tools.sh)
#   KCO_START_TIMEOUT       seconds to wait for readiness (default 120)
#   KCO_STOP_TIMEOUT        seconds between SIGTERM and SIGKILL (default 10)
#   KCO_KEEP_CLUSTER_LOGS   when 1, `down` keeps DIR/logs
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
marker_name=.kco-control-plane
components=(etcd kube-apiserver kube-controller-manager)
# Controllers that make object lifecycles behave as in a cluster: owner
# reference garbage collection, namespace deletion, service accounts with
# their tokens and CA bundle, and aggregated cluster roles (admin, edit, view).
controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller,clusterrole-aggregation-controller

log() { printf 'control-plane: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

usage() {
  sed -n '/^# Usage:/,/^# *hack.*down DIR$/p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# --- processes -------------------------------------------------------------

# Prints the start time of a process (clock ticks since boot), or nothing
# when the process is gone or a zombie. Comparing start times distinguishes a
# process from a later one that reuses its PID.
process_start_time() {
  local stat rest fields
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  rest=${stat##*) }
  read -r -a fields <<<"$rest"
  [ "${fields[0]}" = Z ] && return 0
  echo "${fields[19]}"
}

# Succeeds when PID runs and its command line mentions DIR, so that `down`
# never signals an unrelated process that took over a recorded PID.
process_belongs_to() {
  local pid=$1 dir=$2
  [ -n "$(process_start_time "$pid")" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -e "$dir/" -e "$dir "
}

# Starts a program in its own session, detached from the caller's terminal
# and pipes, and records its PID in DIR/pids/NAME.
start_process() {
  local dir=$1 name=$2
  shift 2
  setsid "$@" </dev/null >>"$dir/logs/$name.log" 2>&1 &
  echo $! >"$dir/pids/$name"
  disown
}

# Prints the PIDs of the named processes of DIR that still run, except the
# calling process itself (the watchdog runs `down`).
running_pids() {
  local dir=$1 name pid
  shift
  for name in "$@"; do
    [ -f "$dir/pids/$name" ] || continue
    pid=$(cat "$dir/pids/$name")
    [ "$pid" = "$$" ] && continue
    process_belongs_to "$pid" "$dir" && echo "$pid"
  done
  return 0
}

# Sends SIGTERM to the named processes and SIGKILL to those still running
# after KCO_STOP_TIMEOUT seconds, then waits until they are gone.
stop_processes() {
  local dir=$1 timeout=${KCO_STOP_TIMEOUT:-10} pids deadline
  shift
  mapfile -t pids < <(running_pids "$dir" "$@")
  [ "${#pids[@]}" -eq 0 ] && return
  kill -TERM "${pids[@]}" 2>/dev/null || true
  deadline=$((SECONDS + timeout))
  while [ "$SECONDS" -lt "$deadline" ]; do
    mapfile -t pids < <(running_pids "$dir" "$@")
    [ "${#pids[@]}" -eq 0 ] && return
    sleep 0.1
  done
  log "processes ${pids[*]} still running ${timeout}s after SIGTERM, sending SIGKILL"
  kill -KILL "${pids[@]}" 2>/dev/null || true
  # The kernel needs a moment to end a killed process; waiting for that
  # keeps the data directory from being removed under a running process.
  for _ in $(seq 50); do
    mapfile -t pids < <(running_pids "$dir" "$@")
    [ "${#pids[@]}" -eq 0 ] && return
    sleep 0.1
  done
}

# Stops the API server and the controller manager before etcd, because the
# API server shuts down slowly while etcd is gone.
stop_all() {
  local dir=$1
  stop_processes "$dir" watchdog kube-controller-manager kube-apiserver
  stop_processes "$dir" etcd
}

# --- ports -----------------------------------------------------------------

# Prints COUNT TCP ports that no socket on this machine uses, chosen at random
# from 10000-31999. That is below Linux's default ephemeral range
# (32768-60999), so outgoing connections do not take them meanwhile.
free_ports() {
  local count=$1 used=" " port chosen=() _ local_address
  # Column 2 of /proc/net/tcp* is the local address as HEX_IP:HEX_PORT.
  while read -r _ local_address _; do
    [[ $local_address == *:* ]] && used+="$((16#${local_address##*:})) "
  done < <(tail -q -n +2 /proc/net/tcp /proc/net/tcp6 2>/dev/null)
  while [ "${#chosen[@]}" -lt "$count" ]; do
    port=$((10000 + RANDOM % 22000))
    case "$used ${chosen[*]} " in *" $port "*) continue ;; esac
    chosen+=("$port")
  done
  echo "${chosen[@]}"
}

# --- certificates ----------------------------------------------------------

# Runs a command and shows its output only when it fails, because openssl
# prints progress even on success.
run_quietly() {
  local output
  output=$("$@" 2>&1) || {
    log "failed: $*"
    printf '%s\n' "$output" >&2
    return 1
  }
}

# Writes NAME.key and NAME.crt in the pki directory, signed by the CA.
# EXTENSIONS is an OpenSSL extension section (subjectAltName, extendedKeyUsage).
issue_certificate() {
  local pki=$1 name=$2 subject=$3 extensions=$4
  run_quietly openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr"
  printf '%s\n' "$extensions" >"$pki/$name.ext"
  run_quietly openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt"
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}

generate_pki() {
  local pki=$1
  mkdir -p "$pki"
  run_quietly openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 3650 -sha256 \
    -subj "/CN=kameleoon-cohort-operator-test-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
  # The kubernetes.default.svc names and 10.0.0.1 (the first address of
  # --service-cluster-ip-range) are the names clients inside a cluster use.
  issue_certificate "$pki" apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature,keyEncipherment"
  issue_certificate "$pki" admin "/O=system:masters/CN=kubernetes-admin" \
    "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature,keyEncipherment"
  # This user name is bound to the bootstrap role system:kube-controller-manager.
  issue_certificate "$pki" controller-manager "/CN=system:kube-controller-manager" \
    "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature,keyEncipherment"
  run_quietly openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$pki/service-account.key"
  run_quietly openssl pkey -in "$pki/service-account.key" -pubout -out "$pki/service-account.pub"
  chmod 600 "$pki"/*.key
}

# --- configuration files ----------------------------------------------------

write_kubeconfig() {
  local path=$1 server=$2 ca=$3 cert=$4 key=$5 user=$6
  cat >"$path" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kco-test
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 <"$ca")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$cert")
    client-key-data: $(base64 -w0 <"$key")
contexts:
- name: kco-test
  context:
    cluster: kco-test
    user: $user
current-context: kco-test
EOF
  chmod 600 "$path"
}

write_env_file() {
  local dir=$1 bin=$2
  {
    printf 'export KUBECONFIG=%q\n' "$dir/kubeconfig"
    printf 'export KCO_TEST_KUBECONFIG=%q\n' "$dir/kubeconfig"
    printf 'export KCO_TOOLS_BIN=%q\n' "$bin"
    printf 'export PATH=%q:"$PATH"\n' "$bin"
  } >"$dir/env"
}

# --- components ------------------------------------------------------------

start_etcd() {
  local dir=$1 bin=$2 client_port=$3 peer_port=$4
  # Loopback-only plain HTTP between the API server and etcd. Skipping fsync
  # speeds up tests, and the data is thrown away at `down` anyway.
  start_process "$dir" etcd "$bin/etcd" \
    --name=kco-test \
    --data-dir="$dir/etcd" \
    --listen-client-urls="http://127.0.0.1:$client_port" \
    --advertise-client-urls="http://127.0.0.1:$client_port" \
    --listen-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-cluster="kco-test=http://127.0.0.1:$peer_port" \
    --unsafe-no-fsync \
    --log-level=warn
}

# With KCO_APISERVER_AUDIT_LOG set to a path, the API server writes one JSON
# audit event per request to it (metadata only), so benchmarks can count the
# requests each client sends.
audit_flags() {
  local dir=$1
  [ -n "${KCO_APISERVER_AUDIT_LOG:-}" ] || return 0
  cat >"$dir/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
POLICY
  printf '%s\n' --audit-policy-file="$dir/audit-policy.yaml" \
    --audit-log-path="$KCO_APISERVER_AUDIT_LOG" --audit-log-format=json
}

start_apiserver() {
  local dir=$1 bin=$2 port=$3 etcd_port=$4 pki=$1/pki
  local audit
  mapfile -t audit < <(audit_flags "$dir")
  # The endpoint reconciler is off because Endpoints may not hold a loopback
  # address, and nothing inside this control plane needs the kubernetes Service.
  start_process "$dir" kube-apiserver "$bin/kube-apiserver" "${audit[@]}" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$port" \
    --cert-dir="$pki" \
    --tls-cert-file="$pki/apiserver.crt" \
    --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --authorization-mode=RBAC \
    --service-account-issuer="https://127.0.0.1:$port" \
    --service-account-key-file="$pki/service-account.pub" \
    --service-account-signing-key-file="$pki/service-account.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --endpoint-reconciler-type=none \
    --profiling=false
}

start_controller_manager() {
  local dir=$1 bin=$2 pki=$1/pki
  # Like kubeadm, every controller acts as its own service account
  # (system:serviceaccount:kube-system:<controller>) under the bootstrap RBAC
  # roles, so the controllers hold the permissions they have in a cluster.
  start_process "$dir" kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig="$dir/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port=0 \
    --leader-elect=false \
    --controllers="$controllers" \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/service-account.key" \
    --root-ca-file="$pki/ca.crt" \
    --profiling=false
}

# Prints the last lines of a component's log.
show_log() {
  local dir=$1 name=$2
  log "last lines of $dir/logs/$name.log:"
  tail -n 40 "$dir/logs/$name.log" >&2 || true
}

# Polls CHECK until it succeeds. Returns 1 on timeout and 2 when component
# NAME exits meanwhile.
wait_for() {
  local dir=$1 name=$2 deadline=$3
  shift 3
  until "$@" >/dev/null 2>&1; do
    process_belongs_to "$(cat "$dir/pids/$name")" "$dir" || return 2
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.2
  done
}

etcd_healthy() {
  curl -sf --max-time 2 "http://127.0.0.1:$1/health" | grep -q '"health":"true"'
}

apiserver_ready() {
  local pki=$1/pki port=$2
  [ "$(curl -s --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$port/readyz")" = ok ]
}

# The service-account controller creates the `default` ServiceAccount in every
# namespace, which shows that the controller manager runs its controllers.
controllers_running() {
  local dir=$1 bin=$2
  "$bin/kubectl" --kubeconfig="$dir/kubeconfig" get serviceaccount default --namespace=default
}

# Starts the three components once. Returns 3 when a component failed because
# its port was taken meanwhile, so the caller can retry with other ports.
start_components() {
  local dir=$1 bin=$2 deadline=$3 etcd_port peer_port api_port status name
  read -r etcd_port peer_port api_port <<<"$(free_ports 3)"
  for name in "${components[@]}"; do
    rm -f "$dir/logs/$name.log" "$dir/pids/$name"
  done
  rm -rf "$dir/etcd"
  write_kubeconfig "$dir/kubeconfig" "https://127.0.0.1:$api_port" "$dir/pki/ca.crt" \
    "$dir/pki/admin.crt" "$dir/pki/admin.key" kubernetes-admin
  write_kubeconfig "$dir/controller-manager.kubeconfig" "https://127.0.0.1:$api_port" "$dir/pki/ca.crt" \
    "$dir/pki/controller-manager.crt" "$dir/pki/controller-manager.key" system:kube-controller-manager

  # The API server retries etcd and the controller manager waits for the API
  # server, so all three start at once.
  start_etcd "$dir" "$bin" "$etcd_port" "$peer_port"
  start_apiserver "$dir" "$bin" "$api_port" "$etcd_port"
  start_controller_manager "$dir" "$bin"

  for name in "${components[@]}"; do
    status=0
    case $name in
      etcd) wait_for "$dir" etcd "$deadline" etcd_healthy "$etcd_port" || status=$? ;;
      kube-apiserver) wait_for "$dir" kube-apiserver "$deadline" apiserver_ready "$dir" "$api_port" || status=$? ;;
      kube-controller-manager) wait_for "$dir" kube-controller-manager "$deadline" controllers_running "$dir" "$bin" || status=$? ;;
    esac
    [ "$status" -eq 0 ] && continue
    if [ "$status" -eq 2 ] && grep -q 'address already in use' "$dir/logs/$name.log"; then
      log "$name could not bind its port, retrying with other ports"
      # An API server that never reached etcd ignores SIGTERM for long.
      KCO_STOP_TIMEOUT=2 stop_all "$dir"
      return 3
    fi
    if [ "$status" -eq 2 ]; then
      log "$name exited during start"
    else
      log "$name was not ready within ${KCO_START_TIMEOUT:-120}s"
    fi
    show_log "$dir" "$name"
    return 1
  done
}

# --- commands --------------------------------------------------------------

tools_bin() {
  if [ -n "${KCO_TOOLS_BIN:-}" ]; then
    echo "$KCO_TOOLS_BIN"
  else
    "$repo/hack/tools.sh"
  fi
}

# Brings DIR down as soon as process PID exits or DIR is gone. Runs as
# `control-plane.sh __watch DIR PID` in its own session.
watch() {
  local dir=$1 pid=$2 start
  start=$(process_start_time "$pid")
  while [ -e "$dir/$marker_name" ] && [ -n "$start" ] && [ "$(process_start_time "$pid")" = "$start" ]; do
    sleep 1
  done
  if [ -e "$dir/$marker_name" ]; then
    log "process $pid exited, stopping the control plane in $dir"
    down "$dir"
  fi
}

up() {
  local dir=$1 watch_pid=$2 bin program attempt status=3 started=$SECONDS
  if [ -e "$dir" ] && [ ! -e "$dir/$marker_name" ] && [ -n "$(ls -A "$dir")" ]; then
    die "$dir exists and is not a control plane directory; choose an empty or new directory"
  fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ -n "$(running_pids "$dir" watchdog "${components[@]}")" ]; then
    die "a control plane is already running in $dir; run '$0 down $dir' first"
  fi
  if [ -n "$watch_pid" ] && [ -z "$(process_start_time "$watch_pid")" ]; then
    die "--watch-pid $watch_pid: no such process"
  fi
  bin=$(tools_bin)
  for program in etcd kube-apiserver kube-controller-manager kubectl; do
    [ -x "$bin/$program" ] || die "$bin/$program not found; run hack/tools.sh"
  done

  rm -rf "${dir:?}"/*
  touch "$dir/$marker_name"
  generate_pki "$dir/pki"
  write_env_file "$dir" "$bin"
  mkdir -p "$dir/logs" "$dir/pids"
  if [ -n "$watch_pid" ]; then
    setsid bash "$0" __watch "$dir" "$watch_pid" </dev/null >>"$dir/logs/watchdog.log" 2>&1 &
    echo $! >"$dir/pids/watchdog"
    disown
  fi

  local deadline=$((SECONDS + ${KCO_START_TIMEOUT:-120}))
  for attempt in 1 2 3; do
    status=0
    start_components "$dir" "$bin" "$deadline" || status=$?
    [ "$status" -ne 3 ] && break
    log "start attempt $attempt failed on a port conflict"
  done
  if [ "$status" -ne 0 ]; then
    KCO_KEEP_CLUSTER_LOGS=1 down "$dir"
    die "start failed; logs are in $dir/logs"
  fi
  log "ready in $((SECONDS - started))s: source $dir/env"
}

down() {
  local dir=$1
  [ -d "$dir" ] || return 0
  dir=$(cd "$dir" && pwd)
  [ -e "$dir/$marker_name" ] || die "$dir is not a control plane directory (no $marker_name file), so it is left as it is"
  stop_all "$dir"
  if [ "${KCO_KEEP_CLUSTER_LOGS:-0}" = 1 ]; then
    find "$dir" -mindepth 1 -maxdepth 1 ! -name logs ! -name "$marker_name" -exec rm -rf {} +
  else
    rm -rf "$dir"
  fi
}

main() {
  [ $# -ge 2 ] || usage
  local command=$1 dir=$2 watch_pid=""
  shift 2
  case $command in
    up)
      while [ $# -gt 0 ]; do
        case $1 in
          --watch-pid)
            [ $# -ge 2 ] || usage
            watch_pid=$2
            shift 2
            ;;
          *) usage ;;
        esac
      done
      up "$dir" "$watch_pid"
      ;;
    down)
      [ $# -eq 0 ] || usage
      down "$dir"
      ;;
    __watch) watch "$dir" "$1" ;;
    *) usage ;;
  esac
}

main "$@"
