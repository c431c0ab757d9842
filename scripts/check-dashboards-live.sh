#!/usr/bin/env bash
# Every Grafana panel has data on a healthy local stack: starts the stack's services, the demo
# notification sinks and Prometheus (scripts/stack.sh up, debug binaries, 2 s scrapes) against the
# running PostgreSQL and Kafka, on a fresh database; sends demo traffic; then runs every panel query
# of grafana/dashboards at that Prometheus (scripts/check-dashboards.py --prometheus) and fails on
# any that returns nothing. Stops what it started (never PostgreSQL or Kafka). About a minute.
#
#   scripts/check-dashboards-live.sh        (scripts/test.sh runs it after the test suite)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

log() { printf '\033[1m[dashboards]\033[0m %s\n' "$*" >&2; }

export OUTBOX_STACK_DIR=${DASHBOARD_STACK_DIR:-$ROOT/target/dashboard-stack}
export PG_DB=${DASHBOARD_DB:-outbox_dashboards}
export STACK_PROFILE=${STACK_PROFILE:-debug}
export PROM_SCRAPE_INTERVAL=${PROM_SCRAPE_INTERVAL:-2s}
export JAEGER=off   # no spans needed here (scripts/check-trace.sh checks them)
PROM=http://127.0.0.1:${PROM_PORT:-9090}
MESSAGES=${DASHBOARD_MESSAGES:-20}

# A fresh database and fresh Prometheus data: what is checked is this run's traffic alone.
psql -h 127.0.0.1 -p "${PG_PORT:-5432}" -U postgres -d postgres -qc "drop database if exists \"$PG_DB\" with (force)" >/dev/null
rm -rf "$OUTBOX_STACK_DIR/prometheus/data"
trap 'scripts/stack.sh services-stop >/dev/null 2>&1 || true' EXIT
scripts/stack.sh up >/dev/null

log "demo traffic: $MESSAGES messages"
for i in $(seq 1 "$MESSAGES"); do
  curl -fsS -o /dev/null -X POST http://127.0.0.1:8080/messages -H 'content-type: application/json' \
    -d "{\"content\": \"dashboard check $i\", \"key\": \"customer-$((i % 5))\"}"
  sleep 0.3
done
# Both notifier routes received every message (logger and notify: two webhooks per message).
for _ in $(seq 1 60); do
  received=$(curl -fsS http://127.0.0.1:8083/metrics | awk '/^notifier_webhooks_received_total\{.*outcome="accepted"/ {s += $2} END {print s + 0}')
  [ "$received" -ge $((2 * MESSAGES)) ] && break
  sleep 1
done
log "the notifier accepted $received webhooks; letting Prometheus scrape"

# rate() over 1m needs two scrapes after the traffic; retry while the last series arrive.
for attempt in 1 2 3 4 5 6; do
  sleep 5
  if python3 scripts/check-dashboards.py --prometheus "$PROM" --rate-interval 1m >"$OUTBOX_STACK_DIR/check.out" 2>&1; then
    grep queried "$OUTBOX_STACK_DIR/check.out"
    log "every panel query returns data"
    exit 0
  fi
  log "attempt $attempt: $(grep queried "$OUTBOX_STACK_DIR/check.out" || echo 'no answer')"
done
grep -E 'FAIL|queried' "$OUTBOX_STACK_DIR/check.out"
exit 1
