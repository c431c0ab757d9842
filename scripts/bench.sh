#!/usr/bin/env bash
# Benchmarks (not tests): each puts the product next to a limit or a peer measured in the same run
# on this machine, prints a Markdown table and, for the sections below marked [plots], writes
# results.json, table.md, throughput.png and latency.png (debezium also timeline.png; with the
# core count and the versions) to bench-results/<section>/<UTC time>/ (ignored by git) and copies
# them to docs/bench/<section>/.
#
#   scripts/bench.sh                    relay and consumer
#   scripts/bench.sh relay [args]       relay-bench (e.g. --events 500000 --rate 1000)
#   scripts/bench.sh consumer [args]    consumer-bench (e.g. --events 50000)
#   scripts/bench.sh debezium [args]    [plots] the relay (its own binary, a process of its own)
#                                       next to Debezium's outbox connector in Kafka Connect,
#                                       same PostgreSQL, same broker, one run:
#                                       warm-up + measured drain of --events N (200000) for each,
#                                       commit-to-record latency at --rates (500,1000,2000,10000) for
#                                       --duration (10s) each after a --warm-up (2s) at that
#                                       rate (counted back, left out of p50/p99/max, shown in
#                                       timeline.png), raw produce ceiling, every event
#                                       counted back. Also --payload-bytes, --partitions (6),
#                                       --keys, --timeout; --set-wal-level (see below).
#                                       BENCH_RELAY_LOG=warn,relay::publish=debug logs the
#                                       relay's timing of every batch (default: warn);
#                                       --relay-only measures the relay alone, without Kafka
#                                       Connect (a quick look at a change of the relay; its
#                                       results stay in bench-results/debezium-relay-only/)
#   scripts/bench.sh producer [args]    [plots] POST /messages/s with wrk (--connections 32,
#                                       --duration 15s) next to pgbench running the producer's
#                                       own transaction (--clients 32); goal: at least 80 %
#   scripts/bench.sh e2e [args]         [plots] POST /messages → webhook received at the
#                                       notifier, p50/p99 at --rates (500,2000) for --duration (10s)
#                                       each after a --warm-up (2s) at that rate (counted back,
#                                       left out of p50/p99/max and the stages)
#   scripts/bench.sh --help             this text
#
# debezium fetches Kafka Connect 4.1.1 (connect-runtime, -json, -transforms) and Debezium
# 3.6.1.Final (debezium-connector-postgres, debezium-connect-plugins) with their dependencies from
# Maven Central into ~/.cache/outbox-relay, starts a Connect worker in standalone mode on
# CONNECT_PORT (18089) and stops it when the run ends, however it ends. It needs
# wal_level = logical: when the server has another level the script says so and stops, unless it
# started PostgreSQL itself or --set-wal-level is given; then it sets it (ALTER SYSTEM) and restarts
# the stack's PostgreSQL. Plots use matplotlib from a venv it makes in ~/.cache/outbox-relay/bench-venv
# (scripts/bench-requirements.txt). Figures are noisy when anything else runs on the machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay
KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
DEBEZIUM_VERSION=${DEBEZIUM_VERSION:-3.6.1.Final}
CONNECT_HOME=$CACHE/kafka-connect-$KAFKA_VERSION
DEBEZIUM_HOME=$CACHE/debezium-$DEBEZIUM_VERSION
CONNECT_PORT=${CONNECT_PORT:-18089}
BENCH_VENV=$CACHE/bench-venv

log() { printf '\033[1m[bench]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

which=${1:-all}
case $which in -h|--help|help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
[ $# -gt 0 ] && shift

export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export TEST_KAFKA_BROKERS=${TEST_KAFKA_BROKERS:-127.0.0.1:9092}
pg_port() { local p=${TEST_DATABASE_URL##*:}; p=${p%%/*}; echo "${p:-5432}"; }
PG_WAS_UP=false
if psql "$TEST_DATABASE_URL" -Atqc 'select 1' >/dev/null 2>&1; then PG_WAS_UP=true; fi
PG_PORT=$(pg_port) scripts/stack.sh deps
psql_() { psql "$TEST_DATABASE_URL" -Atqc "$1"; }

# wrk measures the webhook receiver's ceiling next to the consumer, and the producer.
if ! command -v wrk >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null; } || true
fi

versions() { # the line under each table and plot
  local pg; pg=$(psql_ 'show server_version' | cut -d' ' -f1)
  echo "PostgreSQL $pg, Kafka $KAFKA_VERSION${1:+, $1}, $(rustc --version | cut -d' ' -f1-2)"
}

bench_venv() {
  if [ ! -x "$BENCH_VENV/bin/python" ] || ! cmp -s scripts/bench-requirements.txt "$BENCH_VENV/requirements.txt"; then
    log "making the plotting venv in $BENCH_VENV"
    python3 -m venv "$BENCH_VENV"
    "$BENCH_VENV/bin/pip" install -q -r scripts/bench-requirements.txt
    cp scripts/bench-requirements.txt "$BENCH_VENV/requirements.txt"
  fi
}

results_dir() { # results_dir <section>: a fresh folder for this run
  local dir=$ROOT/bench-results/$1/$(date -u +%Y%m%dT%H%M%SZ)
  mkdir -p "$dir"; echo "$dir"
}

report() { # report <section> <dir> <versions> [no-docs]: table and plots, then the latest to docs/bench/
  bench_venv
  "$BENCH_VENV/bin/python" scripts/bench-report.py "$2" "$3"
  if [ "${4:-}" = no-docs ]; then
    log "results in ${2#"$ROOT"/}"
    return
  fi
  mkdir -p "docs/bench/$1"
  cp "$2"/table.md "$2"/results.json "$2"/*.png "docs/bench/$1/" 2>/dev/null || true
  log "results in ${2#"$ROOT"/}; latest copied to docs/bench/$1/"
}

# ---------------------------------------------------------------- debezium
mvn_fetch() { # mvn_fetch <dir> <what> <dependencies xml> [copy-dependencies flags]
  local dir=$1 what=$2 deps=$3; shift 3
  [ -f "$dir/.complete" ] && return
  command -v mvn >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends maven >/dev/null; }
  log "fetching $what from Maven Central into $dir"
  mkdir -p "$dir"
  cat >"$dir/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.outbox</groupId><artifactId>bench-fetch</artifactId><version>1</version>
  <dependencies>$deps</dependencies>
</project>
EOF
  (cd "$dir" && mvn -B -q dependency:copy-dependencies -DincludeScope=runtime "$@" >"$dir/mvn.log" 2>&1) \
    || die "could not fetch $what (see $dir/mvn.log)"
  touch "$dir/.complete"
}

dep() { echo "<dependency><groupId>$1</groupId><artifactId>$2</artifactId><version>$3</version></dependency>"; }

debezium_fetch() {
  command -v java >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >/dev/null; }
  mvn_fetch "$CONNECT_HOME" "Kafka Connect $KAFKA_VERSION" \
    "$(dep org.apache.kafka connect-runtime "$KAFKA_VERSION")$(dep org.apache.kafka connect-json "$KAFKA_VERSION")$(dep org.apache.kafka connect-transforms "$KAFKA_VERSION")$(dep org.apache.logging.log4j log4j-slf4j-impl 2.24.3)$(dep org.apache.logging.log4j log4j-core 2.24.3)" \
    -DoutputDirectory=libs
  # Debezium is built against a newer Kafka: the runtime's own kafka-clients and connect-api
  # must be the ones its classes see, so the plugin folder leaves them out.
  mvn_fetch "$DEBEZIUM_HOME" "Debezium $DEBEZIUM_VERSION" \
    "$(dep io.debezium debezium-connector-postgres "$DEBEZIUM_VERSION")$(dep io.debezium debezium-connect-plugins "$DEBEZIUM_VERSION")" \
    -DoutputDirectory=plugins/debezium-postgres -DexcludeArtifactIds=kafka-clients,connect-api,slf4j-api
}

ensure_logical() {
  local level; level=$(psql_ 'show wal_level')
  [ "$level" = logical ] && return
  if [ "$SET_WAL_LEVEL" != true ] && [ "$PG_WAS_UP" = true ]; then
    die "PostgreSQL has wal_level = $level; Debezium needs logical. Rerun with --set-wal-level to set it (ALTER SYSTEM, then a restart of the stack's PostgreSQL)"
  fi
  log "wal_level is $level: setting logical and restarting PostgreSQL (scripts/stack.sh pg-stop, pg-start)"
  psql_ "alter system set wal_level = logical" >/dev/null
  PG_PORT=$(pg_port) scripts/stack.sh pg-stop
  PG_PORT=$(pg_port) scripts/stack.sh pg-start
  [ "$(psql_ 'show wal_level')" = logical ] || die "wal_level is still not logical (is this server the stack's own?)"
}

CONNECT_PID=
CONNECT_DIR=
connect_stop() {
  if [ -n "$CONNECT_PID" ] && kill -0 "$CONNECT_PID" 2>/dev/null; then
    log "stopping Kafka Connect (pid $CONNECT_PID)"
    kill "$CONNECT_PID"
    for _ in $(seq 1 60); do kill -0 "$CONNECT_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$CONNECT_PID" 2>/dev/null && kill -9 "$CONNECT_PID"
  fi
  CONNECT_PID=
  # A slot left behind by an interrupted run would keep WAL forever.
  psql_ "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name like 'bench_dbz_%' and not active" >/dev/null 2>&1 || true
}

connect_start() {
  (exec 3<>"/dev/tcp/127.0.0.1/$CONNECT_PORT") 2>/dev/null && die "port $CONNECT_PORT is taken (CONNECT_PORT=... to pick another)"
  CONNECT_DIR=$(mktemp -d /tmp/bench-connect.XXXXXX)
  cat >"$CONNECT_DIR/worker.properties" <<EOF
bootstrap.servers=$TEST_KAFKA_BROKERS
key.converter=org.apache.kafka.connect.storage.StringConverter
value.converter=org.apache.kafka.connect.storage.StringConverter
offset.storage.file.filename=$CONNECT_DIR/offsets
offset.flush.interval.ms=1000
plugin.path=$DEBEZIUM_HOME/plugins
listeners=http://127.0.0.1:$CONNECT_PORT
connector.client.config.override.policy=All
EOF
  cat >"$CONNECT_DIR/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $CONNECT_DIR/connect.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
EOF
  log "starting Kafka Connect $KAFKA_VERSION standalone on :$CONNECT_PORT (log: $CONNECT_DIR/connect.log)"
  # The JVM options of Kafka's own connect-standalone.sh (as the broker's in scripts/stack.sh).
  java -Xms256m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$CONNECT_DIR/log4j2.properties" \
    -cp "$CONNECT_HOME/libs/*" org.apache.kafka.connect.cli.ConnectStandalone \
    "$CONNECT_DIR/worker.properties" >"$CONNECT_DIR/connect.out" 2>&1 &
  CONNECT_PID=$!
  trap connect_stop EXIT
  local start=$SECONDS
  until grep -q PostgresConnector <<<"$(curl -fsS "http://127.0.0.1:$CONNECT_PORT/connector-plugins" 2>/dev/null)"; do
    kill -0 "$CONNECT_PID" 2>/dev/null || die "Kafka Connect exited: $(tail -5 "$CONNECT_DIR/connect.out")"
    (( SECONDS - start < 120 )) || die "Kafka Connect did not come up in 120s ($CONNECT_DIR)"
    sleep 1
  done
  log "Kafka Connect is up with the Debezium PostgreSQL connector ($(( SECONDS - start ))s)"
}

bench_debezium() {
  SET_WAL_LEVEL=false
  local args=() relay_only=false
  for a in "$@"; do
    case "$a" in
      --set-wal-level) SET_WAL_LEVEL=true ;;
      --relay-only) relay_only=true; args+=("$a") ;;
      *) args+=("$a") ;;
    esac
  done
  log "building debezium-bench (release)"
  cargo build --quiet --release -p relay --features bench --bin debezium-bench --bin relay
  if $relay_only; then
    local dir; dir=$(results_dir debezium-relay-only)
    target/release/debezium-bench --out "$dir" "${args[@]}"
    report debezium-relay-only "$dir" "$(versions "")" no-docs
    return
  fi
  ensure_logical
  debezium_fetch
  connect_start
  local dir; dir=$(results_dir debezium)
  target/release/debezium-bench --connect-url "http://127.0.0.1:$CONNECT_PORT" --out "$dir" "${args[@]}"
  connect_stop
  report debezium "$dir" "$(versions "Kafka Connect $KAFKA_VERSION standalone, Debezium $DEBEZIUM_VERSION")"
}

# ---------------------------------------------------------------- producer, e2e
bench_producer() {
  command -v pgbench >/dev/null || die "pgbench is missing (Debian: postgresql-contrib)"
  command -v wrk >/dev/null || die "wrk is missing (Debian: wrk)"
  log "building producer-bench (release)"
  cargo build --quiet --release -p producer --example producer-bench
  local dir; dir=$(results_dir producer)
  target/release/examples/producer-bench --out "$dir" --scripts "$ROOT/scripts/bench" "$@"
  report producer "$dir" "$(versions "$(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), pgbench $(pgbench --version | awk '{print $3}')")"
}

bench_e2e() {
  log "building e2e-bench (release)"
  cargo build --quiet --release -p e2e --example e2e-bench
  local dir; dir=$(results_dir e2e)
  target/release/examples/e2e-bench --out "$dir" "$@"
  report e2e "$dir" "$(versions)"
}

case $which in
  all|relay|consumer)
    if [ "$which" = all ] || [ "$which" = relay ]; then
      cargo run --quiet --release -p relay --features bench --bin relay-bench -- "$@"
    fi
    if [ "$which" = all ] || [ "$which" = consumer ]; then
      cargo run --quiet --release -p consumer --bin consumer-bench -- "$@"
    fi ;;
  debezium) bench_debezium "$@" ;;
  producer) bench_producer "$@" ;;
  e2e) bench_e2e "$@" ;;
  *) die "unknown section '$which' (try --help)" ;;
esac
