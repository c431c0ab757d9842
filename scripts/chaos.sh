#!/usr/bin/env bash
# The chaos drill: faults under steady traffic, then a loss accounting and a timeline picture.
#
#   scripts/chaos.sh --brokers 3 --relays 2 --consumers 2     the default drill, about 5 minutes
#   scripts/chaos.sh --private --duration 1m --faults broker,relay,receiver
#
# Brings the stack up as asked (scripts/stack.sh up --brokers/--relays/--consumers), starts two
# webhook receivers of its own (scripts/chaos/receiver.py: verifies the signature, records every
# event it accepts; "healthy" always answers 200, "failing" answers 503 when told) and subscribes
# both to every event, posts --rate messages per second through POST /messages, and runs the
# faults one after the other while the traffic flows; each next fault starts --gap after the
# previous one has recovered. Then it waits (at most --drain-timeout) until both receivers have
# every acknowledged message and counts per receiver, Jepsen total-queue style: attempted,
# acknowledged (201), received (accepted, signature verified), lost = acknowledged - received,
# unexpected = received - attempted, duplicates (allowed: delivery is at least once); plus the
# longest stall and each fault's recovery time (from the fault's end until its receiver has every
# message acknowledged before that end). Results (summary.txt, summary.json, timeline.png,
# samples.csv, the receivers' logs, stack.log) go to --results. Exits 1 if anything was lost or
# unexpected, 2 if the drill could not run.
#
# Faults (default: all that apply, in this order; --faults a,b picks, --skip a,b leaves out):
#   kafka     every Kafka node stopped for --kafka-down (30s) (with one broker: the broker)
#   broker    Kafka node --broker-victim (2) SIGKILLed, started after --broker-down (30s); 3 brokers
#   relay     the leading relay SIGKILLed; the standby takes over; restarted after --relay-down (5s)
#   consumer  consumer --consumer-victim (1) SIGKILLed mid-batch, started after --consumer-down (5s)
#   receiver  the failing receiver answers 503 for --receiver-down (20s): its breaker opens, holds, closes
#   postgres  PostgreSQL stopped, started after --pg-down (5s) (only a PostgreSQL the stack runs)
#
# Options:
#   --brokers N --relays N --consumers N   the stack's shape (passed to scripts/stack.sh up)
#   --rate R (200)  --duration D (4m, at least: traffic lasts until the last fault recovered)
#   --warmup D (10s)  --gap D (10s)  --recovery-timeout D (2m)  --drain-timeout D (3m)
#   --private       a stack of the drill's own (CHAOS_PRIVATE=1): OUTBOX_STACK_DIR
#                   /var/tmp/outbox-drill, PG_PORT 5445, KAFKA_PORT 19140 (controllers 19141),
#                   SERVICE_PORT_BASE 19190 unless set; no .env; wiped first (what a killed run
#                   left is not counted again); stopped at the end unless --keep
#   --keep          leave the private stack running
#   --no-up         use the stack as it runs (do not call scripts/stack.sh up)
#   --results DIR   default target/chaos/<UTC time>
#
# Without --private the drill runs against your normal stack (scripts/stack.sh's defaults, or the
# OUTBOX_STACK_DIR and ports in your environment): it really stops that stack's Kafka and
# PostgreSQL. The services it starts itself get drill timings unless you set them: BREAKER_OPEN_FOR
# 10s, DELIVERY_LEASE 30s, RETRY_SCHEDULE with ten attempts over about two hours, and
# KAFKA_STATISTICS_INTERVAL 1s (for the lag curve); already running services keep theirs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STACK=$ROOT/scripts/stack.sh

log() { printf '\033[1m[chaos]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

brokers="" relays="" consumers="" private=${CHAOS_PRIVATE:-} keep="" no_up="" results=""
drill_args=()
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    --brokers) brokers=${2:?}; shift 2 ;;
    --relays) relays=${2:?}; shift 2 ;;
    --consumers) consumers=${2:?}; shift 2 ;;
    --private) private=1; shift ;;
    --keep) keep=1; shift ;;
    --no-up) no_up=1; shift ;;
    --results) results=${2:?}; shift 2 ;;
    --rate|--duration|--faults|--skip|--warmup|--gap|--kafka-down|--broker-down|--broker-victim|\
    --relay-down|--consumer-victim|--consumer-down|--receiver-down|--pg-down|--recovery-timeout|\
    --drain-timeout|--workers)
      drill_args+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    *) die "unknown option '$1' (see scripts/chaos.sh --help)" ;;
  esac
done

if [ -n "$private" ]; then
  export OUTBOX_STACK_DIR=${OUTBOX_STACK_DIR:-/var/tmp/outbox-drill}
  export PG_PORT=${PG_PORT:-5445}
  export KAFKA_PORT=${KAFKA_PORT:-19140}
  export KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-19141}
  export SERVICE_PORT_BASE=${SERVICE_PORT_BASE:-19190}
  export KAFKA_HEAP=${KAFKA_HEAP:-384m}
  # Nothing of the normal stack's settings may leak into the private one.
  export OUTBOX_ENV_FILE=none
  unset DATABASE_URL KAFKA_BROKERS LISTEN_ADDR ENDPOINTS_FILE
  [ "$OUTBOX_STACK_DIR" != /var/tmp/outbox-stack ] || die "--private needs an OUTBOX_STACK_DIR of its own"
  log "private stack in $OUTBOX_STACK_DIR (PostgreSQL :$PG_PORT, Kafka :$KAFKA_PORT…, services :$SERVICE_PORT_BASE…)"
fi
export KAFKA_STATISTICS_INTERVAL=${KAFKA_STATISTICS_INTERVAL:-1s}
export BREAKER_OPEN_FOR=${BREAKER_OPEN_FOR:-10s}
export DELIVERY_LEASE=${DELIVERY_LEASE:-30s}
export RETRY_SCHEDULE=${RETRY_SCHEDULE:-0s,5s,10s,30s,1m,2m,5m,10m,30m,1h}

# matplotlib for the timeline, in a virtualenv of the drill's own.
VENV=${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay/chaos-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$ROOT/scripts/chaos/requirements.txt"
fi

cleanup() {
  if [ -n "$private" ] && [ -z "$keep" ]; then
    log "stopping the private stack"
    "$STACK" down >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

up_args=()
[ -n "$brokers" ] && up_args+=(--brokers "$brokers")
[ -n "$relays" ] && up_args+=(--relays "$relays")
[ -n "$consumers" ] && up_args+=(--consumers "$consumers")
if [ -n "$private" ] && [ -z "$no_up" ] && [ -d "$OUTBOX_STACK_DIR" ]; then
  # The private stack is the drill's alone: what a killed run left (its processes, an outbox in
  # whatever state that run ended) would be counted by this one, so it starts from nothing.
  log "wiping the private stack left in $OUTBOX_STACK_DIR"
  "$STACK" down >/dev/null 2>&1 || true
  rm -rf "$OUTBOX_STACK_DIR"
fi
if [ -z "$no_up" ]; then
  log "scripts/stack.sh up ${up_args[*]}"
  "$STACK" up ${up_args[@]+"${up_args[@]}"} >&2 || die "the stack did not come up"
fi
eval "$("$STACK" info ${up_args[@]+"${up_args[@]}"})"

results=${results:-$ROOT/target/chaos/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$results"
pg_managed=()
[ "$PG_MANAGED" = true ] && pg_managed=(--pg-managed)
set +e
"$VENV/bin/python" "$ROOT/scripts/chaos/drill.py" \
  --stack-script "$STACK" --results "$results" --database-url "$DATABASE_URL" \
  --brokers "$STACK_BROKERS" --relays "$STACK_RELAYS" --consumers "$STACK_CONSUMERS" \
  ${pg_managed[@]+"${pg_managed[@]}"} --python "$VENV/bin/python" ${drill_args[@]+"${drill_args[@]}"}
rc=$?
set -e
log "the services' and Kafka's logs: $LOGS"
exit "$rc"
