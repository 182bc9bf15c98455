#!/usr/bin/env bash
# Builds single-node VictoriaMetrics for the local stack, pinned, into the cache dir (outside
# the repo): source from the Go module proxy, compiled with the local Go toolchain (no cgo).
#   -> $CACHE/bin/victoria-metrics-$VM_VERSION
# Idempotent: a warm cache makes this a stat() and one `victoria-metrics -version`.
# VictoriaMetrics takes InfluxDB line protocol on /write and /api/v2/write; the stack runs it
# only when asked (`devstack up --with victoriametrics`), the tests ask.
set -euo pipefail

VM_VERSION=v1.151.0
VM_SUM=h1:Svzb/7gPYbzmQnvLjab8h1Jl9olB76mokDE7ykvF/ro=           # module zip hash, as in go.sum
VM_GIT_COMMIT=83fc70c6aced                                       # tag's commit (proxy Origin)

CACHE=${FROUTER_CACHE:-$HOME/.cache/failover-router}
mkdir -p "$CACHE/bin"

say() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

VM="$CACHE/bin/victoria-metrics-$VM_VERSION"
want="victoria-metrics-tags-$VM_VERSION-0-g$VM_GIT_COMMIT"
if [ -x "$VM" ] && out=$("$VM" -version 2>&1) && [ "${out%%$'\n'*}" = "$want" ]; then
  say "ok: victoria-metrics=$VM_VERSION $VM"
  exit 0
fi

command -v go >/dev/null || die "go toolchain not found (needed to build victoria-metrics $VM_VERSION); install Go >= 1.26"
export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-modcacherw
export GOTOOLCHAIN=local CGO_ENABLED=0

tmp=$(mktemp -d "$CACHE/bin/.victoria-metrics-$VM_VERSION.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

say "downloading github.com/VictoriaMetrics/VictoriaMetrics@$VM_VERSION from the Go module proxy"
json=$(go mod download -json "github.com/VictoriaMetrics/VictoriaMetrics@$VM_VERSION" 2>&1) \
  || die "go mod download VictoriaMetrics@$VM_VERSION failed: $(printf '%s' "$json" | tr '\n\t' '  ')"
sum=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Sum": "\(.*\)",*$/\1/p' | awk 'NR==1')
[ "$sum" = "$VM_SUM" ] || die "VictoriaMetrics $VM_VERSION module hash is $sum, expected $VM_SUM"

say "building victoria-metrics $VM_VERSION with go install (cold: ~1 min on 2 cores)"
# Its go.mod asks for a recent Go (1.26.x); GOTOOLCHAIN=local makes an older one fail loudly.
ldflags="-s -w -X github.com/VictoriaMetrics/VictoriaMetrics/lib/buildinfo.Version=$want"
GOBIN="$tmp" go install -trimpath -ldflags "$ldflags" \
  "github.com/VictoriaMetrics/VictoriaMetrics/app/victoria-metrics@$VM_VERSION" >&2 \
  || die "go install victoria-metrics $VM_VERSION failed (see output above)"

out=$("$tmp/victoria-metrics" -version 2>&1) || die "built victoria-metrics does not run: ${out%%$'\n'*}"
[ "${out%%$'\n'*}" = "$want" ] || die "built victoria-metrics reports '${out%%$'\n'*}', expected '$want'"
mv -f "$tmp/victoria-metrics" "$VM"

say "ok: victoria-metrics=$VM_VERSION $VM"
