#!/usr/bin/env bash
# Builds InfluxDB 1.8.3's server for the local stack, pinned, into the cache dir (outside the
# repo): source from the Go module proxy, compiled with the local Go toolchain (pure Go, no cgo).
#   -> $CACHE/bin/influxd-$INFLUXDB_VERSION
# Idempotent: a warm cache makes this a stat() and one `influxd version`.
#
# 1.8 serves the v2 compatibility API (/health, /api/v2/write?bucket=db/rp with
# "Authorization: Token user:pass"), so the stack proves the router's v2 path against a real
# server. 1.12/1.13 need Rust's libflux and do not build here.
set -euo pipefail

INFLUXDB_VERSION=v1.8.3
INFLUXDB_SUM=h1:WEypI1BQFTT4teLM+1qkEcvUi0dAvopAI/ir0vAiBg8=   # module zip hash, as in go.sum
INFLUXDB_BRANCH=1.8                                             # shown by `influxd version`

CACHE=${FROUTER_CACHE:-$HOME/.cache/failover-router}
mkdir -p "$CACHE/bin"

say() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

INFLUXD="$CACHE/bin/influxd-$INFLUXDB_VERSION"
want="InfluxDB $INFLUXDB_VERSION (git: $INFLUXDB_BRANCH unknown)"
# Whole output first: `| head -n1` under pipefail fails at random on SIGPIPE.
if [ -x "$INFLUXD" ] && out=$("$INFLUXD" version 2>&1) && [ "${out%%$'\n'*}" = "$want" ]; then
  say "ok: influxd=$INFLUXDB_VERSION $INFLUXD"
  exit 0
fi

command -v go >/dev/null || die "go toolchain not found (needed to build influxd $INFLUXDB_VERSION); install Go >= 1.22"
export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-modcacherw
export GOTOOLCHAIN=local CGO_ENABLED=0

tmp=$(mktemp -d "$CACHE/bin/.influxd-$INFLUXDB_VERSION.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

say "downloading github.com/influxdata/influxdb@$INFLUXDB_VERSION from the Go module proxy"
json=$(go mod download -json "github.com/influxdata/influxdb@$INFLUXDB_VERSION" 2>&1) \
  || die "go mod download github.com/influxdata/influxdb@$INFLUXDB_VERSION failed: $(printf '%s' "$json" | tr '\n\t' '  ')"
sum=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Sum": "\(.*\)",*$/\1/p' | awk 'NR==1')
[ "$sum" = "$INFLUXDB_SUM" ] || die "influxdb $INFLUXDB_VERSION module hash is $sum, expected $INFLUXDB_SUM"

say "building influxd $INFLUXDB_VERSION with go install (cold: ~2 min on 2 cores)"
ldflags="-s -w -X main.version=${INFLUXDB_VERSION#v} -X main.branch=$INFLUXDB_BRANCH"
GOBIN="$tmp" go install -trimpath -ldflags "$ldflags" \
  "github.com/influxdata/influxdb/cmd/influxd@$INFLUXDB_VERSION" >&2 \
  || die "go install influxd $INFLUXDB_VERSION failed (see output above)"

out=$("$tmp/influxd" version 2>&1) || die "built influxd does not run: ${out%%$'\n'*}"
[ "${out%%$'\n'*}" = "$want" ] || die "built influxd reports '${out%%$'\n'*}', expected '$want'"
mv -f "$tmp/influxd" "$INFLUXD"

say "ok: influxd=$INFLUXDB_VERSION $INFLUXD"
