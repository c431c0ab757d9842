#!/usr/bin/env bash
# Builds Jaeger (the "backend v2" all-in-one: UI on :16686, OTLP on 4317/4318) from source through
# the Go module proxy, once per machine, and caches the binary next to the Kafka jars.
#
#   scripts/jaeger.sh build   build it unless cached (about 6 minutes of Go compile on 2 cores)
#   scripts/jaeger.sh path    print the cached binary's path; exits 1 when it is not built
#
# `go install github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0` is refused because Jaeger's go.mod
# has replace directives; as a tool dependency of a throwaway module it builds.
set -euo pipefail

JAEGER_VERSION=${JAEGER_VERSION:-v1.76.0}
CACHE=${KAFKA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}
JAEGER_HOME=$CACHE/jaeger-$JAEGER_VERSION
JAEGER_BIN=$JAEGER_HOME/jaeger

log() { printf '\033[1m[jaeger]\033[0m %s\n' "$*" >&2; }

build() {
  if [ -x "$JAEGER_BIN" ]; then log "cached: $JAEGER_BIN"; return; fi
  command -v go >/dev/null || { log "error: Go is not installed"; exit 1; }
  local mod=$JAEGER_HOME/module
  mkdir -p "$mod"
  log "building Jaeger $JAEGER_VERSION in $mod (takes minutes)"
  (
    cd "$mod"
    [ -f go.mod ] || go mod init local.outbox/jaeger >/dev/null 2>&1
    go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION"
    # Built to a temporary name first, so an interrupted build never leaves a broken cached binary.
    go build -o jaeger.partial github.com/jaegertracing/jaeger/cmd/jaeger
    mv jaeger.partial "$JAEGER_BIN"
  )
  log "built $JAEGER_BIN"
}

case ${1:-build} in
  build) build ;;
  path) [ -x "$JAEGER_BIN" ] && echo "$JAEGER_BIN" ;;
  *) log "usage: $0 build|path"; exit 2 ;;
esac
