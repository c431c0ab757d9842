#!/usr/bin/env bash
# The local stack without Docker: real PostgreSQL (Debian's package) and Apache Kafka 4 in KRaft mode
# (the official broker jars from Maven Central), plus the four services.
#
#   scripts/stack.sh up [--brokers N] [--relays N] [--consumers N]
#                                 install what is missing, start PostgreSQL, Kafka and the services
#   scripts/stack.sh deps [--brokers N]   only PostgreSQL and Kafka (what the tests need)
#                                 and Prometheus (:9090, scraping every instance started, alert rules loaded)
#   scripts/stack.sh down         stop everything this script started
#   scripts/stack.sh status       what runs, and where (each Kafka node, each service instance)
#   scripts/stack.sh kafka-stop   stop every Kafka node (chaos: the outbox keeps filling, rows turn X)
#   scripts/stack.sh kafka-start  start them again
#   scripts/stack.sh broker-stop N [--kill]   stop Kafka node N (SIGTERM; SIGKILL with --kill)
#   scripts/stack.sh broker-start N           start Kafka node N again
#   scripts/stack.sh kill relay-leader        SIGKILL the relay instance that holds the leader lock
#   scripts/stack.sh kill|stop|start SERVICE [N]   SIGKILL / SIGTERM / start one instance
#                                 (SERVICE: producer, relay, consumer, notifier; N defaults to 1)
#   scripts/stack.sh leader       print the number of the relay instance that leads
#   scripts/stack.sh url SERVICE [N]      print an instance's base URL (http://127.0.0.1:8092)
#   scripts/stack.sh bootstrap    print the Kafka bootstrap list the services get
#   scripts/stack.sh info         the stack's sizes, ports and URLs as KEY=value lines (for scripts)
#   scripts/stack.sh pg-stop | pg-start   the same for PostgreSQL
#   scripts/stack.sh migrate      apply every service's migrations (sql/) to DATABASE_URL's database
#   scripts/stack.sh prometheus-start | prometheus-stop   only Prometheus (after `up`: a fresh scrape config)
#   scripts/stack.sh services-stop   stop what `up` adds (services, Prometheus, sinks, Jaeger), leave PostgreSQL and Kafka
#   scripts/stack.sh jaeger-start | jaeger-stop   only Jaeger (jaeger-start builds it when missing,
#                                 and its UI with it; `scripts/jaeger.sh build-ui` builds the UI alone)
#
# `up` starts Jaeger (query API and UI :16686, OTLP :4317 gRPC / :4318 HTTP; traces kept in memory)
# and points the services at it (OTEL_EXPORTER_OTLP_ENDPOINT) when scripts/jaeger.sh has built it:
# the first `up` on a machine builds it and its UI (about 6 + 3 minutes); JAEGER=off skips Jaeger
# and tracing.
#
# `up` also starts the demo notification sinks (scripts/demo-sinks.py: SMTP on :2525, a chat Bot API
# on :8099) and subscribes the notifier's /webhooks/notify to every event, so notifications flow.
# STACK_PROFILE=debug runs target/debug binaries (what `cargo test` built) instead of a release build;
# PROM_SCRAPE_INTERVAL overrides the scrape interval of prometheus/prometheus.yml.
#
# --brokers N (1, the default, or 3): N KRaft nodes on loopback, each broker and controller, one
# controller quorum. With 3, every topic (the product's and the internal ones: offsets, transaction
# and share state) has replication factor 3 and min.insync.replicas=2. Node n listens on
# KAFKA_PORT + 3(n-1) (9092, 9095, 9098) and its controller on KAFKA_CONTROLLER_PORT + 3(n-1) (9093,
# 9096, 9099); the services get all of them as KAFKA_BROKERS. Changing the size of a stopped
# cluster formats its storage anew (topics and offsets start empty).
#
# --relays N / --consumers N (default 1): instance n > 1 of a service runs on the service's port
# + 10(n-1) (relay 2 on 8091, consumer 2 on 8092), with its own log ($LOGS/relay-2.log) and pid
# file. The relays elect one leader (the others stand by); the consumers share one group.
#
# Ports: PG_PORT (5432), KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093) and SERVICE_PORT_BASE
# (8080: producer, +1 relay, +2 consumer, +3 notifier). With another OUTBOX_STACK_DIR they run a
# second, separate stack (the chaos tests and scripts/chaos.sh --private stop and start their own so
# that other tests keep theirs). The sizes and ports a stack was started with are remembered in
# $OUTBOX_STACK_DIR/stack.conf, so later subcommands need only OUTBOX_STACK_DIR; variables set in
# the environment win over it, and over .env.
# OUTBOX_BIN_DIR: run the service binaries from there (e.g. target/debug) instead of building
# target/release. OUTBOX_ENV_FILE: the services' settings file (default .env; `none`: no file).
# Every subcommand is idempotent. State lives in $OUTBOX_STACK_DIR (default /var/tmp/outbox-stack), shared by
# every clone on the machine, so a second checkout finds the same broker instead of fighting it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STACK_DIR=${OUTBOX_STACK_DIR:-/var/tmp/outbox-stack}
CONF=$STACK_DIR/stack.conf
# What the stack was started with; the environment wins (each line is `: "${VAR:=value}"`).
# shellcheck disable=SC1090
[ -f "$CONF" ] && . "$CONF"
KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
KAFKA_HOME=${KAFKA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}/kafka-$KAFKA_VERSION
KAFKA_HEAP=${KAFKA_HEAP:-512m}
# The JVM options of Kafka's own start scripts (kafka-run-class.sh's KAFKA_JVM_PERFORMANCE_OPTS):
# G1 aiming at 20 ms pauses. With G1's default aim (200 ms) one young collection of the broker
# took 110 ms during a 2,000 events/s run on a 2-core box, stopping every produce meanwhile; with
# these options its pauses were 15-38 ms.
KAFKA_JVM_OPTS=${KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true}
PG_PORT=${PG_PORT:-5432}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
SERVICE_PORT_BASE=${SERVICE_PORT_BASE:-8080}
STACK_BROKERS=${STACK_BROKERS:-1}
STACK_RELAYS=${STACK_RELAYS:-1}
STACK_CONSUMERS=${STACK_CONSUMERS:-1}
PG_DB=${PG_DB:-outbox}
PG_DATA=$STACK_DIR/postgres
LOGS=$STACK_DIR/logs
STACK_PROFILE=${STACK_PROFILE:-release}
if [ "$STACK_PROFILE" = debug ]; then BIN_DIR=${OUTBOX_BIN_DIR:-$ROOT/target/debug}; else BIN_DIR=${OUTBOX_BIN_DIR:-$ROOT/target/release}; fi
PROM_PORT=${PROM_PORT:-9090}
PROM_DIR=$STACK_DIR/prometheus
PROM_SCRAPE_INTERVAL=${PROM_SCRAPE_INTERVAL:-}
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

save_conf() {
  mkdir -p "$STACK_DIR"
  cat >"$CONF" <<CONF
# Written by scripts/stack.sh: what this stack was started with (the environment wins).
: "\${STACK_BROKERS:=$STACK_BROKERS}"
: "\${STACK_RELAYS:=$STACK_RELAYS}"
: "\${STACK_CONSUMERS:=$STACK_CONSUMERS}"
: "\${PG_PORT:=$PG_PORT}"
: "\${KAFKA_PORT:=$KAFKA_PORT}"
: "\${KAFKA_CONTROLLER_PORT:=$KAFKA_CONTROLLER_PORT}"
: "\${SERVICE_PORT_BASE:=$SERVICE_PORT_BASE}"
: "\${KAFKA_HEAP:=$KAFKA_HEAP}"
CONF
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
  if command -v pg_lsclusters >/dev/null && grep -q " $PG_PORT online" <<<"$(pg_lsclusters -h 2>/dev/null)"; then
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
  if [ "$(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc "select 1 from pg_database where datname='$PG_DB'")" != 1 ]; then
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
  java -Xms128m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -Dkafka.logs.dir="$LOGS/kafka-tools" \
    -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" -cp "$KAFKA_HOME/libs/*" "$@"
}

# Node n of the cluster: its ports, data directory, pid file and console log. Node 1 keeps the
# single-node names ($STACK_DIR/kafka, kafka.pid), so a one-node stack looks as it always did.
node_port() { echo $(( KAFKA_PORT + 3 * ($1 - 1) )); }
node_controller_port() { echo $(( KAFKA_CONTROLLER_PORT + 3 * ($1 - 1) )); }
node_suffix() { if [ "$1" = 1 ]; then echo ""; else echo "-$1"; fi; }
node_dir() { echo "$STACK_DIR/kafka$(node_suffix "$1")"; }
node_pidfile() { echo "$STACK_DIR/kafka$(node_suffix "$1").pid"; }
nodes() { seq 1 "$STACK_BROKERS"; }

# The bootstrap list the services get: every node.
kafka_bootstrap() {
  local n list=()
  for n in $(nodes); do list+=("127.0.0.1:$(node_port "$n")"); done
  (IFS=,; echo "${list[*]}")
}

check_node() {
  [[ $1 =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= STACK_BROKERS )) \
    || die "no Kafka node '$1': this stack has $STACK_BROKERS (nodes 1..$STACK_BROKERS; see --brokers)"
}

node_config() { # node_config <n>
  local n=$1 dir rf isr voters="" m quorum
  dir=$(node_dir "$n")
  mkdir -p "$dir"
  # Three copies of every partition (two must acknowledge a write) once there are three nodes.
  rf=$(( STACK_BROKERS < 3 ? STACK_BROKERS : 3 ))
  isr=$(( rf >= 3 ? 2 : 1 ))
  if [ "$STACK_BROKERS" = 1 ]; then
    quorum="controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT"
  else
    for m in $(nodes); do voters+="${voters:+,}$m@127.0.0.1:$(node_controller_port "$m")"; done
    quorum="controller.quorum.voters=$voters"
  fi
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=$n
$quorum
listeners=PLAINTEXT://127.0.0.1:$(node_port "$n"),CONTROLLER://127.0.0.1:$(node_controller_port "$n")
advertised.listeners=PLAINTEXT://127.0.0.1:$(node_port "$n"),CONTROLLER://127.0.0.1:$(node_controller_port "$n")
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=6
auto.create.topics.enable=false
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
group.initial.rebalance.delay.ms=0
log.retention.hours=24
PROPS
}

node_pid() { # the running node's pid, or nothing
  local pid
  pid=$(cat "$(node_pidfile "$1")" 2>/dev/null || true)
  # A pid file may outlive its process and its pid be reused: only a Kafka of this node counts, so
  # a private stack's stale file never makes it signal the shared broker.
  if [ -n "$pid" ] && grep -qaF -- "$(node_dir "$1")/server.properties" "/proc/$pid/cmdline" 2>/dev/null; then echo "$pid"; return; fi
  pgrep -f "kafka\\.Kafka $(node_dir "$1")/server.properties" | head -n1 || true
}

# A cluster formatted for another number of nodes cannot simply be started with this one.
kafka_check_size() {
  local formatted n
  formatted=$(cat "$STACK_DIR/kafka/cluster-size" 2>/dev/null || true)
  if [ -z "$formatted" ]; then
    # Storage of a single node from before sizes were recorded.
    [ -f "$STACK_DIR/kafka/data/meta.properties" ] && formatted=1 || return 0
  fi
  [ "$formatted" = "$STACK_BROKERS" ] && return 0
  for n in $(seq 1 "$formatted"); do
    [ -n "$(STACK_BROKERS=$formatted node_pid "$n")" ] \
      && die "Kafka runs as $formatted node(s) here; stop it first (scripts/stack.sh kafka-stop) to start $STACK_BROKERS"
  done
  log "the cluster in $STACK_DIR had $formatted node(s); formatting it anew for $STACK_BROKERS (topics and offsets start empty)"
  for n in $(seq 1 "$formatted"); do rm -rf "$(STACK_BROKERS=$formatted node_dir "$n")"; done
}

node_launch() { # node_launch <n>: formats its storage when new and starts it in the background
  local n=$1 dir id
  dir=$(node_dir "$n")
  node_config "$n"
  if [ ! -f "$dir/data/meta.properties" ]; then
    id=$(cat "$STACK_DIR/kafka-cluster-id" 2>/dev/null || true)
    if [ -z "$id" ] || [ ! -f "$STACK_DIR/kafka/cluster-size" ]; then
      id=$(kafka_java kafka.tools.StorageTool random-uuid)
      echo "$id" >"$STACK_DIR/kafka-cluster-id"
    fi
    log "formatting Kafka node $n's storage (cluster id $id)"
    if [ "$STACK_BROKERS" = 1 ]; then
      kafka_java kafka.tools.StorageTool format --standalone -t "$id" -c "$dir/server.properties" >/dev/null
    else
      kafka_java kafka.tools.StorageTool format -t "$id" -c "$dir/server.properties" >/dev/null
    fi
    mkdir -p "$STACK_DIR/kafka"
    echo "$STACK_BROKERS" >"$STACK_DIR/kafka/cluster-size"
  fi
  log "starting Kafka $KAFKA_VERSION node $n of $STACK_BROKERS on 127.0.0.1:$(node_port "$n") (KRaft, heap $KAFKA_HEAP)"
  # Each node its own log: $LOGS/kafka.log for node 1, $LOGS/kafka-2/kafka.log for node 2.
  local logs=$LOGS
  [ "$n" = 1 ] || logs=$LOGS/kafka-$n
  mkdir -p "$logs"
  # shellcheck disable=SC2086 # KAFKA_JVM_OPTS is a list of options
  nohup java -Xms256m -Xmx"$KAFKA_HEAP" $KAFKA_JVM_OPTS -Dkafka.logs.dir="$logs" \
    -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" -cp "$KAFKA_HOME/libs/*" \
    kafka.Kafka "$dir/server.properties" >>"$logs/kafka.out" 2>&1 &
  echo $! >"$(node_pidfile "$n")"
}

# The node answers for the cluster: it lists topics, and the cluster's metadata has it as a live broker.
node_ready() {
  local port; port=$(node_port "$1")
  port_open "$port" || return 1
  if [ "$STACK_BROKERS" = 1 ]; then
    kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$port" --list >/dev/null 2>&1
  else
    grep -q "^127.0.0.1:$port (id: $1 " \
      <<<"$(kafka_java org.apache.kafka.tools.BrokerApiVersionsCommand --bootstrap-server "127.0.0.1:$port" 2>/dev/null)"
  fi
}

kafka_start() { # kafka_start [n...]: the given nodes (default: all), started together
  local n todo=()
  # shellcheck disable=SC2046 # numbers
  [ $# -gt 0 ] || set -- $(nodes)
  for n in "$@"; do
    if port_open "$(node_port "$n")"; then log "Kafka node $n already answers on 127.0.0.1:$(node_port "$n")"; else todo+=("$n"); fi
  done
  [ ${#todo[@]} -gt 0 ] || return 0
  kafka_fetch
  mkdir -p "$LOGS"
  kafka_check_size
  for n in "${todo[@]}"; do node_launch "$n"; done
  # A quorum of three answers only once two controllers run: wait after starting them all.
  for n in "${todo[@]}"; do wait_for "Kafka node $n on 127.0.0.1:$(node_port "$n")" 120 node_ready "$n"; done
}

# Nodes with a pid file or a configuration, whatever the size asked for now.
known_nodes() {
  local f n
  { nodes
    for f in "$STACK_DIR"/kafka-*/server.properties; do
      [ -f "$f" ] || continue
      n=${f%/server.properties}; echo "${n##*kafka-}"
    done; } | sort -nu
}

kafka_stop() { # kafka_stop [--kill] [n...]: the given nodes (default: every one), stopped together
  local sig=TERM n pid pids=()
  if [ "${1:-}" = --kill ]; then sig=KILL; shift; fi
  # shellcheck disable=SC2046 # numbers
  [ $# -gt 0 ] || set -- $(known_nodes)
  for n in "$@"; do
    pid=$(node_pid "$n")
    if [ -z "$pid" ]; then log "Kafka node $n is not running"; continue; fi
    kill -"$sig" "$pid"
    pids+=("$n:$pid")
  done
  for entry in "${pids[@]}"; do
    n=${entry%%:*}; pid=${entry#*:}
    for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    # The last nodes of a cluster may wait for a controller quorum that is gone.
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$(node_pidfile "$n")"
    log "Kafka node $n stopped$([ "$sig" = KILL ] && echo ' (SIGKILL)')"
  done
}

# ---------------------------------------------------------------- Prometheus
# Debian's package, run as a plain process with its own config and data in the stack dir (not the
# package's systemd service, which would scrape its own config).

# The instances this stack started, one "<job> <host:port>" line each: the scrape targets. The one
# place that knows which instances run, so more instances per service only change this function.
scrape_targets() {
  local s
  local n
  for s in "${SERVICES[@]}"; do
    for n in $(seq 1 "$(service_count "$s")"); do echo "$s 127.0.0.1:$(service_port "$s" "$n")"; done
  done
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
  local bin pid ui args=()
  if ! bin=$("$ROOT/scripts/jaeger.sh" path); then
    if [ "${1:-}" = --if-built ]; then log "Jaeger is not built (scripts/jaeger.sh build): no tracing"; return 1; fi
    "$ROOT/scripts/jaeger.sh" build
    bin=$("$ROOT/scripts/jaeger.sh" path)
    # The first start on a machine builds the UI too; without it the query API still works.
    "$ROOT/scripts/jaeger.sh" build-ui || log "Jaeger's UI did not build: :$JAEGER_UI_PORT serves the query API only"
  fi
  pid=$(cat "$STACK_DIR/jaeger.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then log "Jaeger already runs (pid $pid)"; return; fi
  if jaeger_ready; then log "a Jaeger already answers on :$JAEGER_UI_PORT"; return; fi
  mkdir -p "$LOGS"
  # The built-in all-in-one configuration (OTLP receivers on 127.0.0.1, in-memory storage), with
  # the jaeger-ui build as the UI when scripts/jaeger.sh has built it (the binary has only a
  # placeholder page).
  if ui=$("$ROOT/scripts/jaeger.sh" ui-path); then
    args+=("--set=extensions.jaeger_query.ui.assets_path=$ui")
  else
    log "Jaeger's UI is not built (scripts/jaeger.sh build-ui, minutes once per machine): :$JAEGER_UI_PORT shows a placeholder page"
  fi
  nohup "$bin" ${args[@]+"${args[@]}"} >>"$LOGS/jaeger.log" 2>&1 &
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
# Instance n of a service: "relay" for n = 1, "relay-2" for n = 2 (pid file, log, port).
instance() { if [ "$2" = 1 ]; then echo "$1"; else echo "$1-$2"; fi; }

service_port() { # service_port <service> [n]
  local offset
  case $1 in producer) offset=0;; relay) offset=1;; consumer) offset=2;; notifier) offset=3;; *) die "unknown service '$1'";; esac
  echo $(( SERVICE_PORT_BASE + offset + 10 * (${2:-1} - 1) ))
}

# How many instances of a service the stack runs.
service_count() {
  case $1 in relay) echo "$STACK_RELAYS";; consumer) echo "$STACK_CONSUMERS";; *) echo 1;; esac
}

check_service() { # check_service <service> <n>
  case $1 in producer|relay|consumer|notifier) ;; *) die "unknown service '$1' (producer, relay, consumer, notifier)";; esac
  [[ $2 =~ ^[0-9]+$ ]] && (( $2 >= 1 )) || die "instance number must be 1 or more, not '$2'"
}

# The caller's environment wins over .env (as with docker compose), so that a private stack's
# DATABASE_URL or KAFKA_BROKERS is never replaced by the file's.
load_env_file() {
  local f=${OUTBOX_ENV_FILE:-$ROOT/.env} line key
  [ -f "$f" ] || return 0
  while IFS= read -r -d '' line; do
    key=${line%%=*}
    [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    # shellcheck disable=SC2163 # exports KEY=value
    [ -n "${!key+x}" ] || export "$line"
  done < <(env -i bash -c 'set -a; . "$1"; env -0' _ "$f")
}

services_env() {
  mkdir -p "$LOGS"
  load_env_file
  export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:$PG_PORT/$PG_DB}
  export KAFKA_BROKERS=${KAFKA_BROKERS:-$(kafka_bootstrap)}
  export ALLOW_PRIVATE_ENDPOINTS=${ALLOW_PRIVATE_ENDPOINTS:-true}
  export WEBHOOK_SECRET=${WEBHOOK_SECRET:-$(local_secret)}
  export ENDPOINTS_FILE=${ENDPOINTS_FILE:-$STACK_DIR/endpoints.json}
  # Spans to the stack's Jaeger when it runs (OTLP over HTTP/protobuf).
  if jaeger_ready && [ -z "${OTEL_EXPORTER_OTLP_ENDPOINT+x}" ]; then export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318; fi
  # The notifier's demo channels: the sinks above (scripts/demo-sinks.py).
  export SMTP_HOST=${SMTP_HOST-127.0.0.1} SMTP_PORT=${SMTP_PORT:-$SMTP_SINK_PORT} SMTP_TO=${SMTP_TO:-ops@example.com}
  export CHAT_API_URL=${CHAT_API_URL:-http://127.0.0.1:$CHAT_SINK_PORT} CHAT_BOT_TOKEN=${CHAT_BOT_TOKEN-demo-token} CHAT_ID=${CHAT_ID:-demo-chat}
  if [ "$ENDPOINTS_FILE" = "$STACK_DIR/endpoints.json" ]; then
    cat >"$ENDPOINTS_FILE" <<JSON
[{"id": "notifier-logger", "url": "http://127.0.0.1:$(service_port notifier)/webhooks/logger", "event_types": ["*"],
  "description": "local stack: the notifier's logger", "secret": "${WEBHOOK_SECRET%%,*}"},
 {"id": "notifier-notify", "url": "http://127.0.0.1:$(service_port notifier)/webhooks/notify", "event_types": ["*"],
  "description": "local stack: the notifier's email and chat notifications (demo sinks)", "secret": "${WEBHOOK_SECRET%%,*}"}]
JSON
  fi
}

build_services() {
  if [ -n "${OUTBOX_BIN_DIR:-}" ]; then
    local s
    for s in "${SERVICES[@]}"; do [ -x "$BIN_DIR/$s" ] || die "$BIN_DIR/$s is missing (OUTBOX_BIN_DIR)"; done
    return
  fi
  if [ "$STACK_PROFILE" = debug ]; then
    log "building the services (cargo build, debug)"
    (cd "$ROOT" && cargo build -q -p producer -p relay -p consumer -p notifier --bins)
  else
    log "building the services (cargo build --release)"
    (cd "$ROOT" && cargo build --release --bins)
  fi
}

instance_pid() { # instance_pid <service> <n>: the running instance's pid, or nothing
  local f pid; f=$STACK_DIR/$(instance "$1" "$2").pid
  pid=$(cat "$f" 2>/dev/null || true)
  # Only a process running this service's binary counts (a stale pid file's pid may be reused).
  [ -n "$pid" ] && grep -qaF -- "/$1" "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
  return 0
}

instance_start() { # instance_start <service> <n> (services_env and build_services done)
  local s=$1 n=$2 name pid
  name=$(instance "$s" "$n")
  pid=$(instance_pid "$s" "$n")
  if [ -n "$pid" ]; then log "$name already runs (pid $pid)"; return; fi
  LISTEN_ADDR=127.0.0.1:$(service_port "$s" "$n") nohup "$BIN_DIR/$s" >>"$LOGS/$name.log" 2>&1 &
  echo $! >"$STACK_DIR/$name.pid"
}

instance_wait() {
  local port; port=$(service_port "$1" "$2")
  wait_for "$(instance "$1" "$2") on :$port" 60 curl -fs -o /dev/null "http://127.0.0.1:$port/health"
}

services_start() {
  local s n
  services_env
  build_services
  for s in "${SERVICES[@]}"; do
    for n in $(seq 1 "$(service_count "$s")"); do instance_start "$s" "$n"; done
  done
  for s in "${SERVICES[@]}"; do
    for n in $(seq 1 "$(service_count "$s")"); do instance_wait "$s" "$n"; done
  done
}

# A stable secret for the local stack, so the notifier and the consumer agree across restarts.
local_secret() {
  local f=$STACK_DIR/webhook-secret
  [ -f "$f" ] || echo "whsec_$(head -c 32 /dev/urandom | base64)" >"$f"
  cat "$f"
}

instance_signal() { # instance_signal <TERM|KILL> <service> <n>
  local sig=$1 s=$2 n=$3 name pid
  name=$(instance "$s" "$n")
  pid=$(instance_pid "$s" "$n")
  if [ -z "$pid" ]; then log "$name is not running"; rm -f "$STACK_DIR/$name.pid"; return; fi
  kill -"$sig" "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  rm -f "$STACK_DIR/$name.pid"
  log "$name stopped$([ "$sig" = KILL ] && echo ' (SIGKILL)') (pid $pid)"
}

# Every instance that has a pid file, whatever the configured counts.
running_instances() { # prints "<service> <n>" lines
  local s f n
  for s in "${SERVICES[@]}"; do
    for f in "$STACK_DIR/$s.pid" "$STACK_DIR/$s"-*.pid; do
      [ -f "$f" ] || continue
      n=$(basename "$f" .pid); n=${n#"$s"}; n=${n#-}
      echo "$s ${n:-1}"
    done
  done
}

services_stop() {
  local s n
  running_instances | while read -r s n; do instance_signal TERM "$s" "$n"; done
}

# No `cmd | grep -q` in this script: under pipefail, grep exits at its first match, and a command
# still writing the rest of a large page dies of SIGPIPE, which fails the test it was part of. So a
# command's whole output is read before it is searched.
relay_leads() { # relay_leads <port>: the relay there says it holds the leader lock
  local page
  page=$(curl -fsS --max-time 2 "http://127.0.0.1:$1/metrics" 2>/dev/null) || return 1
  grep -qx 'relay_is_leader 1' <<<"$page"
}

# The relay instance whose /metrics says it holds the leader lock.
relay_leader() {
  local n
  for n in $(seq 1 "$(( STACK_RELAYS > 9 ? STACK_RELAYS : 9 ))"); do
    [ -n "$(instance_pid relay "$n")" ] || continue
    if relay_leads "$(service_port relay "$n")"; then
      echo "$n"; return 0
    fi
  done
  return 1
}

status() {
  local s n port pid role
  printf '%-11s %-8s %s\n' component state where
  if pg_ready; then printf '%-11s %-8s %s\n' postgres up "127.0.0.1:$PG_PORT/$PG_DB"; else printf '%-11s %-8s\n' postgres down; fi
  for n in $(nodes); do
    port=$(node_port "$n"); pid=$(node_pid "$n")
    if port_open "$port"; then
      printf '%-11s %-8s %s\n' "kafka-$n" up "127.0.0.1:$port (controller :$(node_controller_port "$n"), pid ${pid:-?})"
    else
      printf '%-11s %-8s %s\n' "kafka-$n" down "127.0.0.1:$port"
    fi
  done
  for s in "${SERVICES[@]}"; do
    for n in $(seq 1 "$(service_count "$s")"); do
      port=$(service_port "$s" "$n"); pid=$(instance_pid "$s" "$n"); role=""
      if [ "$s" = relay ]; then
        if relay_leads "$port"; then role=" leader"; else role=" standby"; fi
      fi
      if curl -fsS --max-time 2 -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null; then
        printf '%-11s %-8s %s\n' "$(instance "$s" "$n")" up "http://127.0.0.1:$port (pid ${pid:-?})$role"
      else
        printf '%-11s %-8s %s\n' "$(instance "$s" "$n")" down "http://127.0.0.1:$port"
      fi
    done
  done
  echo "kafka bootstrap: $(kafka_bootstrap)"
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

# ---------------------------------------------------------------- command line
cmd=${1:-help}
[ $# -gt 0 ] && shift
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --brokers) STACK_BROKERS=${2:?--brokers needs a number}; shift 2 ;;
    --brokers=*) STACK_BROKERS=${1#*=}; shift ;;
    --relays) STACK_RELAYS=${2:?--relays needs a number}; shift 2 ;;
    --relays=*) STACK_RELAYS=${1#*=}; shift ;;
    --consumers) STACK_CONSUMERS=${2:?--consumers needs a number}; shift 2 ;;
    --consumers=*) STACK_CONSUMERS=${1#*=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
for v in STACK_BROKERS STACK_RELAYS STACK_CONSUMERS; do
  [[ ${!v} =~ ^[1-9][0-9]?$ ]] || die "${v#STACK_} must be a number from 1 to 99, not '${!v}'"
done
set -- ${args[@]+"${args[@]}"}

case $cmd in
  up)
    pg_start; kafka_start; save_conf; sinks_start
    if [ "$JAEGER" != off ]; then jaeger_start || true; fi
    services_start; prometheus_start; status ;;
  deps) pg_start; kafka_start; save_conf; echo "KAFKA_BROKERS=$(kafka_bootstrap)" ;;
  down) prometheus_stop; services_stop; sinks_stop; jaeger_stop; kafka_stop; pg_stop ;;
  services-stop) prometheus_stop; services_stop; sinks_stop; jaeger_stop ;;
  jaeger-start) jaeger_start ;;
  jaeger-stop) jaeger_stop ;;
  prometheus-start) prometheus_start ;;
  prometheus-stop) prometheus_stop ;;
  status) status ;;
  kafka-stop) kafka_stop ;;
  kafka-start) kafka_start; save_conf ;;
  broker-stop)
    [ $# -ge 1 ] || die "usage: broker-stop N [--kill]"
    n=$1; check_node "$n"
    if [ "${2:-}" = --kill ]; then kafka_stop --kill "$n"; else kafka_stop "$n"; fi ;;
  broker-start) [ $# -ge 1 ] || die "usage: broker-start N"; check_node "$1"; kafka_start "$1" ;;
  kill|stop|start)
    [ $# -ge 1 ] || die "usage: $cmd producer|relay|consumer|notifier [N]  (or: kill relay-leader)"
    if [ "$1" = relay-leader ]; then
      [ "$cmd" = kill ] || die "relay-leader goes with kill"
      n=$(relay_leader) || die "no relay instance leads"
      log "relay $n leads"
      instance_signal KILL relay "$n"
    else
      check_service "$1" "${2:-1}"
      case $cmd in
        kill) instance_signal KILL "$1" "${2:-1}" ;;
        stop) instance_signal TERM "$1" "${2:-1}" ;;
        start) services_env; build_services; instance_start "$1" "${2:-1}"; instance_wait "$1" "${2:-1}" ;;
      esac
    fi ;;
  leader) relay_leader || die "no relay instance leads" ;;
  url) [ $# -ge 1 ] || die "usage: url SERVICE [N]"; check_service "$1" "${2:-1}"; echo "http://127.0.0.1:$(service_port "$1" "${2:-1}")" ;;
  bootstrap) kafka_bootstrap ;;
  info)
    ( services_env >/dev/null
      printf '%s=%q\n' STACK_BROKERS "$STACK_BROKERS" STACK_RELAYS "$STACK_RELAYS" STACK_CONSUMERS "$STACK_CONSUMERS" \
        PG_PORT "$PG_PORT" KAFKA_BROKERS "$KAFKA_BROKERS" DATABASE_URL "$DATABASE_URL" \
        PG_MANAGED "$([ -f "$PG_DATA/postmaster.pid" ] && echo true || echo false)" LOGS "$LOGS" ) ;;
  pg-stop) pg_stop ;;
  pg-start) pg_start ;;
  migrate)
    # Each service applies its own schemas' migrations (outbox, producer, webhooks, notifier).
    build_services
    export WEBHOOK_SECRET=${WEBHOOK_SECRET:-$(local_secret)}
    for s in relay producer consumer notifier; do "$BIN_DIR/$s" migrate; done ;;
  help|-h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" ;;
  *) die "unknown subcommand '$cmd' (try: scripts/stack.sh --help)" ;;
esac
