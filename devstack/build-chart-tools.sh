#!/usr/bin/env bash
# Builds the tools that prove the Helm chart, the alert rules and the dashboard, pinned, into the
# cache dir (outside the repo), all from the Go module proxy with the local Go toolchain:
#   helm           -> $CACHE/bin/helm-$HELM_VERSION            (helm lint, helm template)
#   helm-unittest  -> $CACHE/bin/helm-unittest-$HELM_UNITTEST_VERSION (standalone binary)
#   prometheus     -> $CACHE/bin/prometheus-$PROMETHEUS_VERSION (the dashboard/alert test's server)
# (promtool, same module and version as prometheus, is built by install.sh.)
# `build-chart-tools.sh helm` or `... prometheus` builds one chain; no argument builds both side
# by side, each logging to its own file (shown when it fails).
# Idempotent: a warm cache makes this three stat() calls and three `--help` runs.
# Cold on 2 shared cores: helm ~4.5 min, helm-unittest ~1 min, prometheus ~6 min (less when
# promtool was built first: they share most packages in the go build cache).
set -euo pipefail

HELM_VERSION=v3.22.0
HELM_UNITTEST_VERSION=v1.1.2
PROMETHEUS_VERSION=v0.316.0   # the Go module version of Prometheus 3.x; no web UI assets (API only)

CACHE=${FROUTER_CACHE:-$HOME/.cache/failover-router}
mkdir -p "$CACHE/bin"

say() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "go toolchain not found (needed to build helm, helm-unittest, prometheus)"
export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-modcacherw
export GOTOOLCHAIN=local CGO_ENABLED=0

HELM="$CACHE/bin/helm-$HELM_VERSION"
UNITTEST="$CACHE/bin/helm-unittest-$HELM_UNITTEST_VERSION"
PROMETHEUS="$CACHE/bin/prometheus-$PROMETHEUS_VERSION"

runs() { [ -x "$1" ] && "$1" --help >/dev/null 2>&1; }

# go install PKG@VERSION, the binary renamed to DEST (atomic rename from a temp dir beside it).
go_install() {
  local pkg=$1 version=$2 dest=$3 tmp
  tmp=$(mktemp -d "$CACHE/bin/.build.XXXXXX")
  GOBIN="$tmp" go install -trimpath "$pkg@$version" || { rm -rf "$tmp"; return 1; }
  mv -f "$tmp/$(basename "$pkg")" "$dest"
  rm -rf "$tmp"
}

build_helm() {
  if ! runs "$HELM"; then
    say "building helm $HELM_VERSION with go install (cold: ~4.5 min)"
    go_install helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "$HELM"
  fi
  # helm-unittest's go.mod has a replace directive, so `go install ...@version` refuses it:
  # build it from the downloaded module source instead (files from the module cache are
  # read-only and carry no exec bits, hence the copy and chmod).
  if ! runs "$UNITTEST"; then
    say "building helm-unittest $HELM_UNITTEST_VERSION from its module source (cold: ~1 min)"
    local json dir tmp
    json=$(go mod download -json "github.com/helm-unittest/helm-unittest@$HELM_UNITTEST_VERSION")
    dir=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p' | awk 'NR==1')
    [ -n "$dir" ] && [ -f "$dir/go.mod" ] || { echo "no module dir in: $json"; return 1; }
    tmp=$(mktemp -d "$CACHE/bin/.build.XXXXXX")
    cp -R "$dir" "$tmp/src"
    chmod -R u+w "$tmp/src"
    (cd "$tmp/src" && go build -trimpath -o "$tmp/helm-unittest" ./cmd/helm-unittest) \
      || { rm -rf "$tmp"; return 1; }
    mv -f "$tmp/helm-unittest" "$UNITTEST"
    rm -rf "$tmp"
  fi
}

build_prometheus() {
  if ! runs "$PROMETHEUS"; then
    say "building prometheus $PROMETHEUS_VERSION with go install (cold: ~6 min)"
    go_install github.com/prometheus/prometheus/cmd/prometheus "$PROMETHEUS_VERSION" "$PROMETHEUS"
  fi
}

# Which builds: "helm" (helm + helm-unittest), "prometheus", or both (no argument) side by side.
what=${1:-all}
case "$what" in helm | prometheus | all) ;; *) die "usage: build-chart-tools.sh [helm|prometheus]" ;; esac
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
pids=()
names=()
if [ "$what" != prometheus ]; then
  build_helm >"$logs/helm" 2>&1 &
  pids+=("$!")
  names+=(helm)
fi
if [ "$what" != helm ]; then
  build_prometheus >"$logs/prometheus" 2>&1 &
  pids+=("$!")
  names+=(prometheus)
fi
failed=""
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || failed="$failed ${names[$i]}"
done
for name in "${names[@]}"; do
  grep '^\[install\]' "$logs/$name" >&2 || true
done
for name in $failed; do
  sed 's/^/    /' "$logs/$name" | tail -n 30 >&2
done
[ -z "$failed" ] || die "build failed:$failed (see output above)"
bins=()
[ "$what" = prometheus ] || bins+=("$HELM" "$UNITTEST")
[ "$what" = helm ] || bins+=("$PROMETHEUS")
for bin in "${bins[@]}"; do
  runs "$bin" || die "$bin was built but does not run"
  say "ok: $(basename "$bin")"
done
