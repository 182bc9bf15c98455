#!/usr/bin/env bash
# Installs what the local stack needs, pinned, into the cache dir (outside the repo):
#   Debian `influxdb` (apt), Apache Kafka jars (Maven Central), toxiproxy-server and consul
#   (built from the Go module proxy).
# Idempotent: a warm cache makes this a few stat() calls.
set -euo pipefail

KAFKA_VERSION=4.1.1
TOXIPROXY_VERSION=v2.5.0
INFLUXDB_DEB_VERSION=1.6.7~rc0-1+b13

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${FROUTER_CACHE:-$HOME/.cache/failover-router}
mkdir -p "$CACHE/bin"

say() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "not root and no sudo: cannot apt-get install $*"
  SUDO=sudo
fi

apt_install() {
  # Never let a package's own service start (influxdb would take 8086/8088).
  local rc_hidden=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    rc_hidden=1
  fi
  say "apt-get install $*"
  if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null; then
    $SUDO apt-get update -q >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
  fi
  if [ "$rc_hidden" = 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
}

# --- InfluxDB 1.x (Debian) ---------------------------------------------------------------
if ! command -v influxd >/dev/null; then
  apt_install "influxdb=${INFLUXDB_DEB_VERSION}"
fi
# If the packaged service runs anyway (e.g. on a host with systemd), stop it: we run our own.
if command -v systemctl >/dev/null && systemctl is-active --quiet influxdb 2>/dev/null; then
  $SUDO systemctl disable --now influxdb >/dev/null 2>&1 || true
fi

# --- Java + Maven (present on this machine kind; installed if missing) --------------------
command -v java >/dev/null || apt_install openjdk-17-jre-headless
command -v mvn >/dev/null || apt_install maven

# --- openssl (Debian; present on this machine kind) ----------------------------------------
# Makes the stack's throwaway CA, certificates and encrypted client key at the first `up`
# (devstack/pki.py); Kafka's TLS listeners are always on, so every stack needs it.
command -v openssl >/dev/null || apt_install openssl

# --- Kafka jars from Maven Central ---------------------------------------------------------
KAFKA_LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
if [ ! -f "$KAFKA_LIBS/.complete" ]; then
  say "resolving org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its runtime deps from Maven Central"
  rm -rf "$KAFKA_LIBS"
  mkdir -p "$KAFKA_LIBS"
  mvn -q -B -f "$HERE/kafka-pom.xml" -Dkafka.version="$KAFKA_VERSION" \
      -Dmaven.repo.local="$CACHE/m2" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" >&2 \
    || die "maven could not resolve kafka_2.13:$KAFKA_VERSION (see output above)"
  touch "$KAFKA_LIBS/.complete"
fi

# --- Go-built tools ------------------------------------------------------------------------
command -v go >/dev/null || die "go toolchain not found (needed to build toxiproxy); install Go >= 1.22"
export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-modcacherw
TOXI="$CACHE/bin/toxiproxy-server-$TOXIPROXY_VERSION"
if [ ! -x "$TOXI" ]; then
  say "building toxiproxy-server $TOXIPROXY_VERSION with go install"
  tmp=$(mktemp -d)
  GOBIN="$tmp" go install "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION" >&2 \
    || die "go install toxiproxy $TOXIPROXY_VERSION failed"
  mv "$tmp/server" "$TOXI"
  rm -rf "$tmp"
fi

# --- Servers built from the Go module proxy, side by side -------------------------------------
# Consul (build-consul.sh), InfluxDB 1.8.3 (build-influxd.sh) and VictoriaMetrics
# (build-victoriametrics.sh), each cached under $CACHE/bin. Run at once, so one build's
# downloads and links overlap another's compiles. Cold, on 2 shared cores, influxd and
# victoria-metrics side by side took 3 min together (183 s and 117 s); Consul alone ~5 min.
go_build_pids=()
bash "$HERE/build-chart-tools.sh" helm &   # helm + helm-unittest (prometheus: below)
go_build_pids+=("$!")
for script in build-consul.sh build-influxd.sh build-victoriametrics.sh; do
  bash "$HERE/$script" &
  go_build_pids+=("$!")
done
go_build_failed=0
for pid in "${go_build_pids[@]}"; do wait "$pid" || go_build_failed=1; done
[ "$go_build_failed" = 0 ] || die "a Go build failed (see its [install] error above)"

# --- Chromium (Debian) for the status page's browser tests (Playwright drives it) -------------
# Never `playwright install`: it downloads a browser build of its own. Cold: seconds (~81 MB).
[ -x /usr/bin/chromium ] || apt_install chromium

# --- promtool (Go module proxy) for `promtool check metrics` on the router's /metrics ---------
# Cold: 8 min of CPU (11.5 min wall measured while other builds shared the 2 cores); the go
# build cache under $CACHE/go is shared, so prometheus (build-chart-tools.sh) reuses most of it.
PROMTOOL_VERSION=v0.316.0
PROMTOOL="$CACHE/bin/promtool-$PROMTOOL_VERSION"
if [ ! -x "$PROMTOOL" ]; then
  say "building promtool $PROMTOOL_VERSION with go install"
  tmp=$(mktemp -d "$CACHE/bin/.promtool.XXXXXX")
  GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$tmp" \
    go install "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_VERSION" >&2 \
    || die "go install promtool $PROMTOOL_VERSION failed"
  mv "$tmp/promtool" "$PROMTOOL"
  rm -rf "$tmp"
fi

# --- prometheus (Go module proxy; see build-chart-tools.sh) -----------------------------------
# The server of the dashboard/alerts test. Built after promtool, whose packages it reuses from
# the go build cache (helm and helm-unittest, for the chart's tests, were built with the
# servers above).
bash "$HERE/build-chart-tools.sh" prometheus

say "ok: kafka=$KAFKA_VERSION toxiproxy=$TOXIPROXY_VERSION influxd=$(command -v influxd) consul=$(ls "$CACHE"/bin/consul-* | head -1)"
