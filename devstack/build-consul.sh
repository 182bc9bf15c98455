#!/usr/bin/env bash
# Builds a real Consul agent binary for the local stack, pinned, into the cache dir (outside
# the repo): source from the Go module proxy, compiled with the local Go toolchain (no cgo).
#   -> $CACHE/bin/consul-$CONSUL_VERSION
# Idempotent: a warm cache makes this a stat() and one `consul version`.
#
# Why not `go install github.com/hashicorp/consul@...`: Consul's root go.mod replaces its own
# sub-modules (api, sdk, proto-public, envoyextensions, troubleshoot) with ./dirs that are not
# in the module zip, so go install refuses it. We copy the module source to a temp dir, drop
# those local replaces, and take the sub-modules from the proxy at the versions the root go.mod
# requires (the ones tagged with that release), pinned by the go.sum lines below.
set -euo pipefail

# v1.16.3 is the newest MPL-2.0 Consul the proxy serves: v1.16.4, v1.16.5 and v1.15.5 are
# refused (403), and v1.16.6 / v1.15.10 are under the BUSL.
CONSUL_VERSION=v1.16.3
CONSUL_SUM=h1:XwZrfgL8x0lK0hvGzwD1kUowvkbFtQblc9H6wDfH0Tc=   # module zip hash, as in go.sum
CONSUL_GIT_COMMIT=1123b47f3a7e                                # tag's commit (proxy .info Origin)
CONSUL_BUILD_DATE=2023-10-31T14:28:19Z                        # tag's commit time (proxy .info)
# go.sum lines for the sub-modules the local replaces used to hide. All but envoyextensions are
# also in sum.golang.org; envoyextensions v0.4.1 is served by the proxy but has no sumdb entry
# (lookup 404), so pinning its hash here is what lets the build verify it at all.
CONSUL_SUBMODULE_SUMS='
github.com/hashicorp/consul/api v1.25.1 h1:CqrdhYzc8XZuPnhIYZWH45toM0LB9ZeYr/gvpLVI3PE=
github.com/hashicorp/consul/api v1.25.1/go.mod h1:iiLVwR/htV7mas/sy0O+XSuEnrdBUUydemjxcUrAt4g=
github.com/hashicorp/consul/envoyextensions v0.4.1 h1:7s3IXE+qmwjPbZPva+8BjHLrpkFrFkNE+z/6X/O6PQc=
github.com/hashicorp/consul/envoyextensions v0.4.1/go.mod h1:PkLAV99qviACPT7v8Pn7d/vacZixC8/4fuZpR7Rf7vA=
github.com/hashicorp/consul/proto-public v0.4.1 h1:k1RWFQo3uvtaLyC8ZEdP2jJOCiNp/7Tp8zz9MsjAxc8=
github.com/hashicorp/consul/proto-public v0.4.1/go.mod h1:ENwzmloQTUPAYPu7nC1mli3VY0Ny9QNi/FSzJ+KlZD0=
github.com/hashicorp/consul/sdk v0.14.1 h1:ZiwE2bKb+zro68sWzZ1SgHF3kRMBZ94TwOCFRF4ylPs=
github.com/hashicorp/consul/sdk v0.14.1/go.mod h1:vFt03juSzocLRFo59NkeQHHmQa6+g7oU0pfzdI1mUhg=
github.com/hashicorp/consul/troubleshoot v0.3.1 h1:M3sAzWRT3xXseRoa/Z8q8Kf+Ws0J1xN8nLDj0dC2UIw=
github.com/hashicorp/consul/troubleshoot v0.3.1/go.mod h1:QjmTNmf2Umo/mqTjW+EhDAHEG2l15B81CkcxhF4GALU=
'

CACHE=${FROUTER_CACHE:-$HOME/.cache/failover-router}
mkdir -p "$CACHE/bin"

say() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

CONSUL="$CACHE/bin/consul-$CONSUL_VERSION"
if [ -x "$CONSUL" ] && "$CONSUL" version >/dev/null 2>&1; then
  say "ok: consul=$CONSUL_VERSION $CONSUL"
  exit 0
fi

command -v go >/dev/null || die "go toolchain not found (needed to build consul $CONSUL_VERSION); install Go >= 1.20"
export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-modcacherw
# Never let the go command fetch another toolchain; Consul is pure Go (the release builds use cgo off too).
export GOTOOLCHAIN=local CGO_ENABLED=0

# Temp dir next to the destination so the final mv is an atomic rename.
tmp=$(mktemp -d "$CACHE/bin/.consul-$CONSUL_VERSION.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

say "downloading github.com/hashicorp/consul@$CONSUL_VERSION from the Go module proxy"
json=$(go mod download -json "github.com/hashicorp/consul@$CONSUL_VERSION" 2>&1) || {
  err=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Error": "\(.*\)",*$/\1/p' | awk 'NR==1' | sed 's/\\[nt]/ /g; s/  */ /g')
  die "go mod download github.com/hashicorp/consul@$CONSUL_VERSION failed: ${err:-$json}"
}
field() { printf '%s\n' "$json" | sed -n "s/^[[:space:]]*\"$1\": \"\(.*\)\",*\$/\1/p" | awk 'NR==1'; }
src_dir=$(field Dir)
sum=$(field Sum)
[ -n "$src_dir" ] && [ -f "$src_dir/go.mod" ] || die "go mod download gave no source dir for consul $CONSUL_VERSION"
[ "$sum" = "$CONSUL_SUM" ] || die "consul $CONSUL_VERSION module hash is $sum, expected $CONSUL_SUM"

say "preparing consul $CONSUL_VERSION source (dropping go.mod replaces of its ./sub-modules)"
cp -R "$src_dir" "$tmp/src"
chmod -R u+w "$tmp/src"
cd "$tmp/src"
# Drop every replace whose target is a local path; the requires name the proxy versions.
go mod edit -json \
  | sed -n '/"Replace": \[/,/^[[:space:]]*\]/p' \
  | awk '/"Old": \{/ {old=1; next} /"New": \{/ {old=0; next}
         /"Path":/ { gsub(/[",]/, "", $2); if (old) o=$2; else if ($2 ~ /^\.\.?\//) print o }' \
  | while read -r mod; do go mod edit -dropreplace="$mod"; done
if grep -Eq '=>[[:space:]]*\.\.?/' go.mod; then
  die "go.mod of consul $CONSUL_VERSION still has local replace directives after -dropreplace"
fi
printf '%s' "$CONSUL_SUBMODULE_SUMS" | sed '/^$/d' >> go.sum

say "building consul $CONSUL_VERSION with go build (cold: ~5 min on 2 cores)"
ldflags="-s -w -X github.com/hashicorp/consul/version.GitCommit=$CONSUL_GIT_COMMIT"
ldflags="$ldflags -X github.com/hashicorp/consul/version.BuildDate=$CONSUL_BUILD_DATE"
# Default -mod=readonly: go.mod/go.sum are used as shipped (+ the pinned sums), never re-resolved.
go build -trimpath -ldflags "$ldflags" -o "$tmp/consul" . >&2 \
  || die "go build of consul $CONSUL_VERSION failed (see output above; after a version bump, update CONSUL_SUM and CONSUL_SUBMODULE_SUMS)"

# Whole output first: `| head -n1` under pipefail fails at random when consul gets SIGPIPE.
out=$("$tmp/consul" version 2>&1) || die "built consul does not run: ${out%%$'\n'*}"
got=${out%%$'\n'*}
[ "$got" = "Consul $CONSUL_VERSION" ] || die "built consul reports '$got', expected 'Consul $CONSUL_VERSION'"
mv -f "$tmp/consul" "$CONSUL"

say "ok: consul=$CONSUL_VERSION $CONSUL"
