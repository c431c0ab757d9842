#!/usr/bin/env bash
# The local stack without Docker: real PostgreSQL (Debian's package) and Apache Kafka 4 in KRaft mode
# (the official broker jars from Maven Central), plus the four services.
#
#   scripts/stack.sh up           install what is missing, start PostgreSQL, Kafka, the services and
#                                 Prometheus (:9090, scraping every instance started, alert rules loaded)
#   scripts/stack.sh deps         only PostgreSQL and Kafka (what the tests need)
#   scripts/stack.sh down         stop everything this script started
#   scripts/stack.sh status       what runs, and where
#   scripts/stack.sh kafka-stop   stop the broker (chaos: the outbox keeps filling, rows turn X)
#   scripts/stack.sh kafka-start  start it again
#   scripts/stack.sh pg-stop | pg-start   the same for PostgreSQL
#   scripts/stack.sh migrate      apply every service's migrations (sql/) to DATABASE_URL's database
#   scripts/stack.sh prometheus-start | prometheus-stop   only Prometheus (after `up`: a fresh scrape config)
#   scripts/stack.sh services-stop   stop what `up` adds (services, Prometheus, sinks, Jaeger), leave PostgreSQL and Kafka
#   scripts/stack.sh jaeger-start | jaeger-stop   only Jaeger (jaeger-start builds it when missing)
#
# `up` starts Jaeger (query API and UI :16686, OTLP :4317 gRPC / :4318 HTTP; traces kept in memory)
# and points the services at it (OTEL_EXPORTER_OTLP_ENDPOINT) when scripts/jaeger.sh has built it:
# the first `up` on a machine builds it (about 6 minutes); JAEGER=off skips Jaeger and tracing.
#
# `up` also starts the demo notification sinks (scripts/demo-sinks.py: SMTP on :2525, a chat Bot API
# on :8099) and subscribes the notifier's /webhooks/notify to every event, so notifications flow.
# STACK_PROFILE=debug runs target/debug binaries (what `cargo test` built) instead of a release build;
# PROM_SCRAPE_INTERVAL overrides the scrape interval of prometheus/prometheus.yml.
#
# KAFKA_PORT / KAFKA_CONTROLLER_PORT with another OUTBOX_STACK_DIR run a second, separate broker
# (the chaos tests stop and start their own so that other tests keep theirs).
# Every subcommand is idempotent. State lives in $OUTBOX_STACK_DIR (default /var/tmp/outbox-stack), shared by
# every clone on the machine, so a second checkout finds the same broker instead of fighting it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STACK_DIR=${OUTBOX_STACK_DIR:-/var/tmp/outbox-stack}
KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
KAFKA_HOME=${KAFKA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}/kafka-$KAFKA_VERSION
KAFKA_HEAP=${KAFKA_HEAP:-512m}
PG_PORT=${PG_PORT:-5432}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
PG_DB=${PG_DB:-outbox}
PG_DATA=$STACK_DIR/postgres
KAFKA_DATA=$STACK_DIR/kafka
LOGS=$STACK_DIR/logs
PROM_PORT=${PROM_PORT:-9090}
PROM_DIR=$STACK_DIR/prometheus
PROM_SCRAPE_INTERVAL=${PROM_SCRAPE_INTERVAL:-}
STACK_PROFILE=${STACK_PROFILE:-release}
SMTP_SINK_PORT=${SMTP_SINK_PORT:-2525}
CHAT_SINK_PORT=${CHAT_SINK_PORT:-8099}
SERVICES=(producer relay consumer notifier)

log() { printf '\033[1m[stack]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # wait_for <what> <seconds> <command...>
  local what=$1 secs=$2; shift 2
  local start=$SECONDS
  until "$@"; do
    if (( SECONDS - start >= secs )); then die "$what did not come up within ${secs}s (logs: $LOGS)"; fi
    sleep 0.5
  done
  log "$what is up ($(( SECONDS - start ))s)"
}

apt_install() {
  log "installing Debian packages: $*"
  if [ ! -f "$STACK_DIR/.apt-updated" ]; then apt-get update -qq && mkdir -p "$STACK_DIR" && touch "$STACK_DIR/.apt-updated"; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  [ -n "$dir" ] || return 1
  echo "$dir"
}

as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# ---------------------------------------------------------------- PostgreSQL
pg_install() {
  pg_bin >/dev/null || apt_install postgresql postgresql-contrib
  # Debian's package may start its own cluster on 5432; ours is configured for this product.
  if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q " $PG_PORT online"; then
    if [ ! -f "$PG_DATA/PG_VERSION" ]; then
      log "stopping Debian's default cluster on port $PG_PORT (the stack runs its own)"
      pg_lsclusters -h | awk -v p="$PG_PORT" '$3==p && $4=="online" {print $1, $2}' | while read -r v c; do pg_ctlcluster "$v" "$c" stop || true; done
    fi
  fi
}

pg_start() {
  if port_open "$PG_PORT" && pg_ready; then log "PostgreSQL already answers on $PG_PORT"; pg_create_db; return; fi
  pg_install
  local bin; bin=$(pg_bin)
  mkdir -p "$STACK_DIR" "$LOGS"
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    log "initialising PostgreSQL cluster in $PG_DATA"
    mkdir -p "$PG_DATA"; [ "$(id -u)" = 0 ] && chown postgres: "$PG_DATA" "$STACK_DIR"
    chmod 700 "$PG_DATA"
    as_postgres "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 >/dev/null
    cat >>"$PG_DATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '/tmp'
max_connections = 400
shared_buffers = 256MB
# Every outbox row is written twice (insert, then marked sent) and every delivery too: room for
# that WAL without checkpoints every minute, and compressed full-page images.
wal_level = replica
wal_buffers = 64MB
wal_compression = lz4
max_wal_size = 8GB
checkpoint_timeout = 15min
# Per-statement timings (SELECT * FROM pg_stat_statements) for whoever tunes the pipeline.
shared_preload_libraries = 'pg_stat_statements'
EOF
  fi
  [ "$(id -u)" = 0 ] && chown postgres: "$STACK_DIR" && touch "$LOGS/postgres.log" && chown postgres: "$LOGS/postgres.log"
  as_postgres "$bin/pg_ctl" -D "$PG_DATA" -l "$LOGS/postgres.log" -w -t 60 start >/dev/null
  wait_for "PostgreSQL on 127.0.0.1:$PG_PORT" 60 pg_ready
  pg_create_db
}

pg_ready() { psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; }

pg_create_db() {
  if ! psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc "select 1 from pg_database where datname='$PG_DB'" | grep -q 1; then
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qc "create database \"$PG_DB\"" >/dev/null
    log "created database $PG_DB"
  fi
}

pg_stop() {
  if [ -f "$PG_DATA/postmaster.pid" ]; then
    as_postgres "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null && log "PostgreSQL stopped"
  else
    log "PostgreSQL is not running from $PG_DATA"
  fi
}

# ---------------------------------------------------------------- Kafka
kafka_fetch() {
  if [ -f "$KAFKA_HOME/.complete" ]; then return; fi
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null || apt_install maven
  log "fetching Apache Kafka $KAFKA_VERSION broker jars from Maven Central into $KAFKA_HOME"
  mkdir -p "$KAFKA_HOME"
  cat >"$KAFKA_HOME/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.outbox</groupId><artifactId>kafka-broker</artifactId><version>$KAFKA_VERSION</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>2.24.3</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.24.3</version></dependency>
  </dependencies>
</project>
EOF
  (cd "$KAFKA_HOME" && mvn -B -q dependency:copy-dependencies -DoutputDirectory=libs -DincludeScope=runtime) \
    || die "could not fetch Kafka from Maven Central"
  cat >"$KAFKA_HOME/log4j2.properties" <<'EOF'
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/kafka.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
EOF
  touch "$KAFKA_HOME/.complete"
}

kafka_java() { # kafka_java <main class> <args...>
  java -Xms128m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -Dkafka.logs.dir="$LOGS" \
    -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" -cp "$KAFKA_HOME/libs/*" "$@"
}

kafka_config() {
  mkdir -p "$KAFKA_DATA"
  cat >"$KAFKA_DATA/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DATA/data
num.partitions=6
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=24
EOF
}

kafka_ready() { port_open "$KAFKA_PORT" && kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" --list >/dev/null 2>&1; }

kafka_start() {
  if port_open "$KAFKA_PORT"; then log "Kafka already answers on 127.0.0.1:$KAFKA_PORT"; return; fi
  kafka_fetch
  mkdir -p "$LOGS"
  kafka_config
  if [ ! -f "$KAFKA_DATA/data/meta.properties" ]; then
    local id; id=$(kafka_java kafka.tools.StorageTool random-uuid)
    log "formatting Kafka storage (cluster id $id)"
    kafka_java kafka.tools.StorageTool format --standalone -t "$id" -c "$KAFKA_DATA/server.properties" >/dev/null
  fi
  log "starting Kafka $KAFKA_VERSION (KRaft, heap $KAFKA_HEAP)"
  nohup java -Xms256m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -Dkafka.logs.dir="$LOGS" \
    -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" -cp "$KAFKA_HOME/libs/*" \
    kafka.Kafka "$KAFKA_DATA/server.properties" >"$LOGS/kafka.out" 2>&1 &
  echo $! >"$STACK_DIR/kafka.pid"
  wait_for "Kafka on 127.0.0.1:$KAFKA_PORT" 90 kafka_ready
}

kafka_stop() {
  local pid
  pid=$(cat "$STACK_DIR/kafka.pid" 2>/dev/null || true)
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    pid=$(pgrep -f "kafka\\.Kafka $KAFKA_DATA/server.properties" | head -n1 || true)
  fi
  if [ -z "$pid" ]; then log "Kafka is not running"; return; fi
  kill "$pid"
  for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$STACK_DIR/kafka.pid"
  log "Kafka stopped"
}

# ---------------------------------------------------------------- Prometheus
# Debian's package, run as a plain process with its own config and data in the stack dir (not the
# package's systemd service, which would scrape its own config).

# The instances this stack started, one "<job> <host:port>" line each: the scrape targets. The one
# place that knows which instances run, so more instances per service only change this function.
scrape_targets() {
  local s
  for s in "${SERVICES[@]}"; do echo "$s 127.0.0.1:$(service_port "$s")"; done
}

# The project's scrape configuration (prometheus/prometheus.yml: global settings and jobs) with the
# targets of this stack and the project's alert rules by absolute path.
prometheus_config() {
  mkdir -p "$PROM_DIR"
  {
    echo "# Written by scripts/stack.sh from prometheus/prometheus.yml and scrape_targets(); do not edit."
    if [ -n "$PROM_SCRAPE_INTERVAL" ]; then
      sed -n '/^global:/,/^rule_files:/p' "$ROOT/prometheus/prometheus.yml" | sed '$d' |
        sed -E "s/^(  (scrape|evaluation)_interval:).*/\1 $PROM_SCRAPE_INTERVAL/"
    else
      sed -n '/^global:/,/^rule_files:/p' "$ROOT/prometheus/prometheus.yml" | sed '$d'
    fi
    echo "rule_files:"
    echo "  - $ROOT/prometheus/alerts.yml"
    echo
    echo "scrape_configs:"
    local job target current=""
    while read -r job target; do
      if [ "$job" != "$current" ]; then
        printf '  - job_name: %s\n    static_configs:\n      - targets:\n' "$job"
        current=$job
      fi
      printf '          - "%s"\n' "$target"
    done < <(scrape_targets | sort -s -k1,1)
    printf '  - job_name: prometheus\n    static_configs:\n      - targets: ["127.0.0.1:%s"]\n' "$PROM_PORT"
  } >"$PROM_DIR/prometheus.yml"
}

prometheus_ready() { curl -fsS -o /dev/null "http://127.0.0.1:$PROM_PORT/-/ready" 2>/dev/null; }

prometheus_start() {
  command -v prometheus >/dev/null || apt_install prometheus
  mkdir -p "$LOGS"
  prometheus_config
  local pid; pid=$(cat "$PROM_DIR/prometheus.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -HUP "$pid"; log "Prometheus already runs (pid $pid): reloaded its config"; return
  fi
  if port_open "$PROM_PORT"; then log "something else answers on :$PROM_PORT: not starting Prometheus"; return; fi
  nohup prometheus --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
    --storage.tsdb.retention.time=7d --web.listen-address="127.0.0.1:$PROM_PORT" --web.enable-lifecycle \
    >>"$LOGS/prometheus.log" 2>&1 &
  echo $! >"$PROM_DIR/prometheus.pid"
  wait_for "Prometheus on :$PROM_PORT" 60 prometheus_ready
}

prometheus_stop() {
  local pid; pid=$(cat "$PROM_DIR/prometheus.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    log "Prometheus stopped"
  fi
  rm -f "$PROM_DIR/prometheus.pid"
}

# ---------------------------------------------------------------- Jaeger
JAEGER=${JAEGER:-on}
JAEGER_UI_PORT=16686

jaeger_ready() { curl -fsS -o /dev/null "http://127.0.0.1:$JAEGER_UI_PORT/api/services" 2>/dev/null; }

jaeger_start() { # jaeger_start [--if-built]
  local bin pid
  if ! bin=$("$ROOT/scripts/jaeger.sh" path); then
    if [ "${1:-}" = --if-built ]; then log "Jaeger is not built (scripts/jaeger.sh build): no tracing"; return 1; fi
    "$ROOT/scripts/jaeger.sh" build
    bin=$("$ROOT/scripts/jaeger.sh" path)
  fi
  pid=$(cat "$STACK_DIR/jaeger.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then log "Jaeger already runs (pid $pid)"; return; fi
  if jaeger_ready; then log "a Jaeger already answers on :$JAEGER_UI_PORT"; return; fi
  mkdir -p "$LOGS"
  # The built-in all-in-one configuration: OTLP receivers on 127.0.0.1, in-memory storage.
  nohup "$bin" >>"$LOGS/jaeger.log" 2>&1 &
  echo $! >"$STACK_DIR/jaeger.pid"
  wait_for "Jaeger on :$JAEGER_UI_PORT (OTLP :4317, :4318)" 60 jaeger_ready
}

jaeger_stop() {
  local pid; pid=$(cat "$STACK_DIR/jaeger.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid"; log "Jaeger stopped"; fi
  rm -f "$STACK_DIR/jaeger.pid"
}

# ---------------------------------------------------------------- demo notification sinks
sinks_start() {
  local pid; pid=$(cat "$STACK_DIR/sinks.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then log "notification sinks already run (pid $pid)"; return; fi
  mkdir -p "$LOGS"
  SMTP_SINK_PORT=$SMTP_SINK_PORT CHAT_SINK_PORT=$CHAT_SINK_PORT SINK_LOG=$LOGS/sinks.jsonl \
    nohup python3 "$ROOT/scripts/demo-sinks.py" >>"$LOGS/sinks.log" 2>&1 &
  echo $! >"$STACK_DIR/sinks.pid"
  wait_for "notification sinks (SMTP :$SMTP_SINK_PORT, chat :$CHAT_SINK_PORT)" 20 port_open "$CHAT_SINK_PORT"
}

sinks_stop() {
  local pid; pid=$(cat "$STACK_DIR/sinks.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid"; log "notification sinks stopped"; fi
  rm -f "$STACK_DIR/sinks.pid"
}

# ---------------------------------------------------------------- services
bin_dir() { if [ "$STACK_PROFILE" = debug ]; then echo "$ROOT/target/debug"; else echo "$ROOT/target/release"; fi; }

build_services() {
  if [ "$STACK_PROFILE" = debug ]; then
    log "building the services (cargo build, debug)"
    (cd "$ROOT" && cargo build -q -p producer -p relay -p consumer -p notifier --bins)
  else
    log "building the services (cargo build --release)"
    (cd "$ROOT" && cargo build --release --bins)
  fi
}

services_start() {
  build_services
  mkdir -p "$LOGS"
  set -a
  [ -f "$ROOT/.env" ] && . "$ROOT/.env"
  set +a
  export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:$PG_PORT/$PG_DB}
  export ALLOW_PRIVATE_ENDPOINTS=${ALLOW_PRIVATE_ENDPOINTS:-true}
  export WEBHOOK_SECRET=${WEBHOOK_SECRET:-$(local_secret)}
  export ENDPOINTS_FILE=${ENDPOINTS_FILE:-$STACK_DIR/endpoints.json}
  # Spans to the stack's Jaeger when it runs (OTLP over HTTP/protobuf).
  if jaeger_ready && [ -z "${OTEL_EXPORTER_OTLP_ENDPOINT+x}" ]; then export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318; fi
  # The notifier's demo channels: the sinks above (scripts/demo-sinks.py).
  export SMTP_HOST=${SMTP_HOST-127.0.0.1} SMTP_PORT=${SMTP_PORT:-$SMTP_SINK_PORT} SMTP_TO=${SMTP_TO:-ops@example.com}
  export CHAT_API_URL=${CHAT_API_URL:-http://127.0.0.1:$CHAT_SINK_PORT} CHAT_BOT_TOKEN=${CHAT_BOT_TOKEN-demo-token} CHAT_ID=${CHAT_ID:-demo-chat}
  cat >"$ENDPOINTS_FILE" <<EOF
[{"id": "notifier-logger", "url": "http://127.0.0.1:8083/webhooks/logger", "event_types": ["*"],
  "description": "local stack: the notifier's logger", "secret": "${WEBHOOK_SECRET%%,*}"},
 {"id": "notifier-notify", "url": "http://127.0.0.1:8083/webhooks/notify", "event_types": ["*"],
  "description": "local stack: the notifier's email and chat notifications (demo sinks)", "secret": "${WEBHOOK_SECRET%%,*}"}]
EOF
  for s in "${SERVICES[@]}"; do
    if [ -f "$STACK_DIR/$s.pid" ] && kill -0 "$(cat "$STACK_DIR/$s.pid")" 2>/dev/null; then
      log "$s already runs (pid $(cat "$STACK_DIR/$s.pid"))"; continue
    fi
    nohup "$(bin_dir)/$s" >>"$LOGS/$s.log" 2>&1 &
    echo $! >"$STACK_DIR/$s.pid"
  done
  for s in "${SERVICES[@]}"; do
    local port; port=$(service_port "$s")
    wait_for "$s on :$port" 60 curl -fsS -o /dev/null "http://127.0.0.1:$port/health"
  done
}

service_port() { case $1 in producer) echo 8080;; relay) echo 8081;; consumer) echo 8082;; notifier) echo 8083;; esac; }

# A stable secret for the local stack, so the notifier and the consumer agree across restarts.
local_secret() {
  local f=$STACK_DIR/webhook-secret
  [ -f "$f" ] || echo "whsec_$(head -c 32 /dev/urandom | base64)" >"$f"
  cat "$f"
}

services_stop() {
  for s in "${SERVICES[@]}"; do
    local f=$STACK_DIR/$s.pid
    if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
      kill "$(cat "$f")"; log "$s stopped"
    fi
    rm -f "$f"
  done
}

status() {
  local s port
  printf '%-11s %-8s %s\n' component state where
  if pg_ready; then printf '%-11s %-8s %s\n' postgres up "127.0.0.1:$PG_PORT/$PG_DB"; else printf '%-11s %-8s\n' postgres down; fi
  if port_open "$KAFKA_PORT"; then printf '%-11s %-8s %s\n' kafka up "127.0.0.1:$KAFKA_PORT"; else printf '%-11s %-8s\n' kafka down; fi
  for s in "${SERVICES[@]}"; do
    port=$(service_port "$s")
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null; then
      printf '%-11s %-8s %s\n' "$s" up "http://127.0.0.1:$port"
    else
      printf '%-11s %-8s\n' "$s" down
    fi
  done
  if port_open "$CHAT_SINK_PORT" && port_open "$SMTP_SINK_PORT"; then
    printf '%-11s %-8s %s\n' sinks up "smtp 127.0.0.1:$SMTP_SINK_PORT, chat http://127.0.0.1:$CHAT_SINK_PORT ($LOGS/sinks.jsonl)"
  else
    printf '%-11s %-8s\n' sinks down
  fi
  if jaeger_ready; then
    printf '%-11s %-8s %s\n' jaeger up "http://127.0.0.1:$JAEGER_UI_PORT (OTLP 127.0.0.1:4317, :4318)"
  else
    printf '%-11s %-8s\n' jaeger down
  fi
  if prometheus_ready; then
    local targets
    targets=$(curl -fsS "http://127.0.0.1:$PROM_PORT/api/v1/targets?state=active" 2>/dev/null |
      python3 -c 'import json,sys; t=json.load(sys.stdin)["data"]["activeTargets"]; print("%d/%d targets up" % (sum(x["health"] == "up" for x in t), len(t)))' 2>/dev/null || true)
    printf '%-11s %-8s %s\n' prometheus up "http://127.0.0.1:$PROM_PORT ${targets:+($targets)}"
  else
    printf '%-11s %-8s\n' prometheus down
  fi
  echo "logs: $LOGS"
}

cmd=${1:-help}
case $cmd in
  up)
    pg_start; kafka_start; sinks_start
    if [ "$JAEGER" != off ]; then jaeger_start || true; fi
    services_start; prometheus_start; status ;;
  deps) pg_start; kafka_start ;;
  down) prometheus_stop; services_stop; sinks_stop; jaeger_stop; kafka_stop; pg_stop ;;
  services-stop) prometheus_stop; services_stop; sinks_stop; jaeger_stop ;;
  jaeger-start) jaeger_start ;;
  jaeger-stop) jaeger_stop ;;
  prometheus-start) prometheus_start ;;
  prometheus-stop) prometheus_stop ;;
  status) status ;;
  kafka-stop) kafka_stop ;;
  kafka-start) kafka_start ;;
  pg-stop) pg_stop ;;
  pg-start) pg_start ;;
  migrate)
    # Each service applies its own schemas' migrations (outbox, producer, webhooks, notifier).
    (cd "$ROOT" && cargo build -q --release --bins)
    export WEBHOOK_SECRET=${WEBHOOK_SECRET:-$(local_secret)}
    for s in relay producer consumer notifier; do "$ROOT/target/release/$s" migrate; done ;;
  help|-h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" ;;
  *) die "unknown subcommand '$cmd' (try: up, deps, down, status, kafka-stop, kafka-start, prometheus-start)" ;;
esac
