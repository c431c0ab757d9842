#!/usr/bin/env bash
# One message, one trace across the four services: starts the stack's services and Jaeger
# (scripts/stack.sh up, debug binaries, spans exported over OTLP) on a fresh database, posts one
# message with a `traceparent` of its own, and asks Jaeger's query API (GET /api/traces/{id}) for
# that trace until it holds spans of producer, relay, consumer and notifier. Prints the spans.
# Then checks that :16686 serves Jaeger's real UI (the jaeger-ui build: its page loads the app's
# bundle, which is served), not the binary's placeholder page. With --screenshot FILE it also
# photographs the trace's page in Jaeger's UI with headless Chromium (Debian's `chromium`).
#
# Skips (exit 0, saying so) when Jaeger is not built: `scripts/jaeger.sh build` takes about
# 6 minutes once per machine, which CI does not pay unless the binary is cached. Likewise the UI
# check is skipped, saying so, when `scripts/jaeger.sh build-ui` has not built the UI's assets.
#
#   scripts/check-trace.sh [--screenshot docs/trace.png]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

log() { printf '\033[1m[trace]\033[0m %s\n' "$*" >&2; }
SCREENSHOT=
[ "${1:-}" = --screenshot ] && SCREENSHOT=$(realpath -m "${2:?--screenshot needs a file}")

if ! scripts/jaeger.sh path >/dev/null; then
  log "SKIPPED: Jaeger is not built (scripts/jaeger.sh build, about 6 minutes once per machine)"
  exit 0
fi

export OUTBOX_STACK_DIR=${TRACE_STACK_DIR:-$ROOT/target/trace-stack}
export PG_DB=${TRACE_DB:-outbox_traces}
export STACK_PROFILE=${STACK_PROFILE:-debug}
export OTEL_BSP_SCHEDULE_DELAY=${OTEL_BSP_SCHEDULE_DELAY:-500}   # export every 0.5 s
unset OTEL_EXPORTER_OTLP_ENDPOINT
JAEGER_URL=http://127.0.0.1:16686

psql -h 127.0.0.1 -p "${PG_PORT:-5432}" -U postgres -d postgres -qc "drop database if exists \"$PG_DB\" with (force)" >/dev/null
trap 'scripts/stack.sh services-stop >/dev/null 2>&1 || true' EXIT
JAEGER=on scripts/stack.sh up >/dev/null

trace_id=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
parent_id=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
log "POST /messages with traceparent 00-$trace_id-$parent_id-01"
curl -fsS -o /dev/null -X POST http://127.0.0.1:8080/messages -H 'content-type: application/json' \
  -H "traceparent: 00-$trace_id-$parent_id-01" -d '{"content": "one trace, four services", "key": "customer-42"}'

want="consumer notifier producer relay"
for _ in $(seq 1 60); do
  if curl -fsS "$JAEGER_URL/api/traces/$trace_id" -o "$OUTBOX_STACK_DIR/trace.json" 2>/dev/null; then
    have=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["data"]; print(" ".join(sorted({p["serviceName"] for t in d for p in t["processes"].values()})))' "$OUTBOX_STACK_DIR/trace.json" 2>/dev/null || true)
    # The last spans (the notifier's) arrive a moment after the first.
    if [ "$have" = "$want" ]; then break; fi
  fi
  sleep 1
done
python3 - "$OUTBOX_STACK_DIR/trace.json" <<'PY'
import json, sys
trace = json.load(open(sys.argv[1]))["data"][0]
procs = {k: v["serviceName"] for k, v in trace["processes"].items()}
for s in sorted(trace["spans"], key=lambda s: s["startTime"]):
    print(f"  {procs[s['processID']]:<9} {s['operationName']:<28} {s['duration'] / 1000:8.1f} ms")
PY
if [ "$have" != "$want" ]; then
  log "FAILED: trace $trace_id has spans of [$have], not of all of [$want]"
  exit 1
fi
log "trace $trace_id has spans of all four services: $JAEGER_URL/trace/$trace_id"

if ! scripts/jaeger.sh ui-path >/dev/null; then
  log "SKIPPED the UI check: Jaeger's UI is not built (scripts/jaeger.sh build-ui, minutes once per machine)"
  [ -z "$SCREENSHOT" ] || { log "FAILED: a screenshot needs Jaeger's UI"; exit 1; }
  exit 0
fi
# The trace's page is jaeger-ui's index.html (the placeholder names no bundle), and its bundle is served.
page=$(curl -fsS "$JAEGER_URL/trace/$trace_id")
bundle=$(grep -o 'static/index-[A-Za-z0-9_-]*\.js' <<<"$page" | head -1 || true)
if [ -z "$bundle" ] || ! grep -q '<div id="jaeger-ui-root">' <<<"$page"; then
  log "FAILED: $JAEGER_URL/trace/$trace_id is not Jaeger's UI (the placeholder page? see $OUTBOX_STACK_DIR/logs/jaeger.log)"
  exit 1
fi
size=$(curl -fsS -o /dev/null -w '%{size_download}' "$JAEGER_URL/$bundle") || size=0
if [ "$size" -lt 100000 ]; then
  log "FAILED: Jaeger's UI names $bundle, served with $size bytes"
  exit 1
fi
log "Jaeger's UI serves the jaeger-ui app ($bundle, $size bytes)"

if [ -n "$SCREENSHOT" ]; then
  command -v chromium >/dev/null || { log "chromium is not installed (apt-get install chromium)"; exit 1; }
  # The virtual time budget lets the app fetch the trace and lay it out before the picture.
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,600 \
    --virtual-time-budget=15000 --screenshot="$SCREENSHOT" "$JAEGER_URL/trace/$trace_id" >/dev/null 2>&1
  log "screenshot: $SCREENSHOT"
fi
