#!/usr/bin/env bash
# Builds Jaeger (the "backend v2" all-in-one: UI on :16686, OTLP on 4317/4318) from source through
# the Go module proxy, and Jaeger's UI (the jaeger-ui project) through the npm registry, once per
# machine, and caches both next to the Kafka jars.
#
#   scripts/jaeger.sh build      build the binary unless cached (about 6 minutes of Go compile on 2 cores)
#   scripts/jaeger.sh build-ui   build the UI's assets unless cached (about 3 minutes: npm ci, vite build)
#   scripts/jaeger.sh path       print the cached binary's path; exits 1 when it is not built
#   scripts/jaeger.sh ui-path    print the cached UI assets' directory; exits 1 when they are not built
#
# `go install github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0` is refused because Jaeger's go.mod
# has replace directives; as a tool dependency of a throwaway module it builds. The Go module carries
# no UI (only a placeholder page; Jaeger's releases embed the jaeger-ui build with a `ui` build tag),
# so the UI is built from the jaeger-ui tag of the same version and served with
# `--set=extensions.jaeger_query.ui.assets_path=$(scripts/jaeger.sh ui-path)` (scripts/stack.sh does).
#
# build-ui takes the jaeger-ui source from JAEGER_UI_SRC when set (a jaeger-ui git directory, bare
# or not, holding the tag; or an unpacked source tree), else it clones the tag from GitHub. It needs
# Node.js >= 20.19 and npm; the npm tree (about 650 MB) lives under the cache while it builds and is
# removed afterwards (JAEGER_UI_KEEP_SRC=1 keeps it).
set -euo pipefail

JAEGER_VERSION=${JAEGER_VERSION:-v1.76.0}
JAEGER_UI_VERSION=${JAEGER_UI_VERSION:-$JAEGER_VERSION}   # jaeger-ui tags follow Jaeger's v1 numbers
CACHE=${KAFKA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}
JAEGER_HOME=$CACHE/jaeger-$JAEGER_VERSION
JAEGER_BIN=$JAEGER_HOME/jaeger
JAEGER_UI=$JAEGER_HOME/ui-$JAEGER_UI_VERSION

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

# The jaeger-ui source of $JAEGER_UI_VERSION, unpacked into $1.
ui_source() {
  local dest=$1 src=${JAEGER_UI_SRC:-}
  mkdir -p "$dest"
  if [ -z "$src" ]; then
    log "cloning jaeger-ui $JAEGER_UI_VERSION"
    git clone -q --depth 1 --branch "$JAEGER_UI_VERSION" https://github.com/jaegertracing/jaeger-ui.git "$dest"
  elif git --git-dir="$src" rev-parse -q --verify "$JAEGER_UI_VERSION^{commit}" >/dev/null 2>&1; then
    git --git-dir="$src" archive "$JAEGER_UI_VERSION" | tar -x -C "$dest"
  elif git -C "$src" rev-parse -q --verify "$JAEGER_UI_VERSION^{commit}" >/dev/null 2>&1; then
    git -C "$src" archive "$JAEGER_UI_VERSION" | tar -x -C "$dest"
  elif [ -f "$src/packages/jaeger-ui/package.json" ]; then
    cp -a "$src/." "$dest"
  else
    log "error: JAEGER_UI_SRC=$src is neither a jaeger-ui git directory with tag $JAEGER_UI_VERSION nor a jaeger-ui source tree"
    exit 1
  fi
}

build_ui() {
  if [ -f "$JAEGER_UI/index.html" ]; then log "cached: $JAEGER_UI"; return; fi
  command -v npm >/dev/null || { log "error: Node.js and npm are not installed"; exit 1; }
  # vite 7 needs Node 20.19 or later.
  node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a==20&&b>=19)?0:1)' \
    || { log "error: Node.js $(node --version) is too old for jaeger-ui (needs 20.19 or later)"; exit 1; }
  local work=$CACHE/jaeger-ui-$JAEGER_UI_VERSION
  [ -f "$work/src/package-lock.json" ] || { rm -rf "$work/src"; ui_source "$work/src"; }
  log "building jaeger-ui $JAEGER_UI_VERSION in $work/src (takes minutes)"
  (
    cd "$work/src"
    # The project asks for Node 24 (engine-strict); its build runs on 20.19 as well.
    [ -d node_modules ] || npm ci --engine-strict=false --no-audit --no-fund --loglevel=error
    cd packages/jaeger-ui
    npm run build --silent
  )
  rm -rf "$JAEGER_UI.partial"
  mkdir -p "$JAEGER_HOME"
  cp -a "$work/src/packages/jaeger-ui/build" "$JAEGER_UI.partial"
  mv "$JAEGER_UI.partial" "$JAEGER_UI"
  [ "${JAEGER_UI_KEEP_SRC:-}" = 1 ] || rm -rf "$work"
  log "built $JAEGER_UI"
}

case ${1:-build} in
  build) build ;;
  build-ui) build_ui ;;
  path) [ -x "$JAEGER_BIN" ] && echo "$JAEGER_BIN" ;;
  ui-path) [ -f "$JAEGER_UI/index.html" ] && echo "$JAEGER_UI" ;;
  *) log "usage: $0 build|build-ui|path|ui-path"; exit 2 ;;
esac
