#!/usr/bin/env bash
# Builds the Go programs the tests and the demo need (etcd, kube-apiserver,
# kube-controller-manager, kubectl, helm, a kstatus reader and an Argo CD
# health check runner) from the Go module proxy, once per version, into a
# cache outside the repository.
#
# Usage: hack/tools.sh [bin-dir]
# Prints the directory that holds the programs. TOOLS_CACHE_DIR overrides the
# cache location (default: ~/.cache/kameleoon-cohort-operator/tools).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=versions.env
. "$repo/hack/versions.env"

cache=${TOOLS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kameleoon-cohort-operator/tools}
mkdir -p "$cache"
export GOFLAGS=-mod=mod
export CGO_ENABLED=0

log() { printf 'tools: %s\n' "$*" >&2; }

# Runs a build in a fresh module directory and moves the binaries into place
# only when every step succeeded, so an interrupted build is redone.
build_kubernetes() {
  local dest=$cache/kubernetes-$KUBERNETES_VERSION
  [ -x "$dest/kube-apiserver" ] && [ -x "$dest/kube-controller-manager" ] && [ -x "$dest/kubectl" ] && return
  log "building kube-apiserver, kube-controller-manager and kubectl $KUBERNETES_VERSION (takes a while the first time)"
  local work=$cache/.build-kubernetes-$KUBERNETES_VERSION
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  local staging=v0${KUBERNETES_VERSION#v1}
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  {
    echo "module kameleoon-cohort-operator.local/kubernetes-build"
    echo "go 1.26.0"
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    # The kubernetes module points its staging modules at local directories;
    # pin each one to the published release of the same version instead.
    sed -n "s#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#replace \1 => \1 $staging#p" "$gomod"
  } > go.mod
  local cmds="k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl"
  for c in $cmds; do go get -tool "$c@$KUBERNETES_VERSION" >/dev/null; done
  local ldflags="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitTreeState=clean"
    ldflags+=" -X $p.gitMajor=1 -X $p.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
  done
  mkdir -p out
  # shellcheck disable=SC2086
  go build -trimpath -ldflags "$ldflags" -o out/ $cmds
  mkdir -p "$dest" && mv out/* "$dest/" && cd "$cache" && rm -rf "$work"
}

build_etcd() {
  local dest=$cache/etcd-$ETCD_VERSION
  [ -x "$dest/etcd" ] && return
  log "building etcd $ETCD_VERSION"
  local work=$cache/.build-etcd-$ETCD_VERSION
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  printf 'module kameleoon-cohort-operator.local/etcd-build\ngo 1.26.0\n' > go.mod
  # The etcd server module holds the server's entry point as a library; this
  # file is the whole program around it.
  cat > main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
  go mod tidy >/dev/null
  go build -trimpath -ldflags "-s -w" -o out/etcd .
  mkdir -p "$dest" && mv out/etcd "$dest/" && cd "$cache" && rm -rf "$work"
}

build_helm() {
  local dest=$cache/helm-$HELM_VERSION
  [ -x "$dest/helm" ] && return
  log "building helm $HELM_VERSION"
  local work=$cache/.build-helm-$HELM_VERSION
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  printf 'module kameleoon-cohort-operator.local/helm-build\ngo 1.26.0\n' > go.mod
  go get -tool "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" >/dev/null
  go build -trimpath -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" -o out/helm helm.sh/helm/v4/cmd/helm
  mkdir -p "$dest" && mv out/helm "$dest/" && cd "$cache" && rm -rf "$work"
}

# The kstatus reader is a program of this repository (hack/kstatus) built
# against sigs.k8s.io/cli-utils; its cache key includes the source hash.
build_kstatus() {
  local src=$repo/hack/kstatus
  [ -d "$src" ] || return 0
  local sum
  sum=$(cat "$src"/*.go "$src"/go.mod | sha256sum | cut -c1-12)
  local dest=$cache/kstatus-$CLI_UTILS_VERSION-$sum
  [ -x "$dest/kstatus" ] && { ln -sfn "$dest/kstatus" "$cache/bin/kstatus"; return; }
  log "building the kstatus reader against sigs.k8s.io/cli-utils $CLI_UTILS_VERSION"
  local work=$cache/.build-kstatus
  rm -rf "$work" && mkdir -p "$work" && cp "$src"/*.go "$src"/go.mod "$work/" && cd "$work"
  [ -f "$src/go.sum" ] && cp "$src/go.sum" "$work/"
  go mod tidy >/dev/null
  go build -trimpath -ldflags "-s -w" -o out/kstatus .
  mkdir -p "$dest" && mv out/kstatus "$dest/" && cd "$cache" && rm -rf "$work"
  ln -sfn "$dest/kstatus" "$cache/bin/kstatus"
}

# The Argo CD health check runner is a program of this repository
# (hack/argocd-health). It is built against github.com/yuin/gopher-lua, the
# Lua interpreter Argo CD uses, and its cache key includes the source hash.
build_argocd_health() {
  local src=$repo/hack/argocd-health
  [ -d "$src" ] || return 0
  local sum
  sum=$(cat "$src"/*.go "$src"/go.mod "$src"/go.sum | sha256sum | cut -c1-12)
  local dest=$cache/argocd-health-$sum
  [ -x "$dest/argocd-health" ] && { ln -sfn "$dest/argocd-health" "$cache/bin/argocd-health"; return; }
  log "building the Argo CD health check runner against github.com/yuin/gopher-lua"
  local work=$cache/.build-argocd-health
  rm -rf "$work" && mkdir -p "$work" && cp "$src"/*.go "$src"/go.mod "$src"/go.sum "$work/" && cd "$work"
  go build -trimpath -ldflags "-s -w" -o out/argocd-health .
  mkdir -p "$dest" && mv out/argocd-health "$dest/" && cd "$cache" && rm -rf "$work"
  ln -sfn "$dest/argocd-health" "$cache/bin/argocd-health"
}

mkdir -p "$cache/bin"
build_etcd
build_kubernetes
build_helm
for b in kube-apiserver kube-controller-manager kubectl; do
  ln -sfn "$cache/kubernetes-$KUBERNETES_VERSION/$b" "$cache/bin/$b"
done
ln -sfn "$cache/etcd-$ETCD_VERSION/etcd" "$cache/bin/etcd"
ln -sfn "$cache/helm-$HELM_VERSION/helm" "$cache/bin/helm"
build_kstatus
build_argocd_health
echo "$cache/bin"
