#!/usr/bin/env bash
# Sets up everything the tests need and runs them: PostgreSQL and Kafka (scripts/stack.sh deps,
# installing them when missing), the Python tools some tests use as independent peers (an SMTP
# server, a Standard Webhooks verifier, schemathesis), then the whole Rust test suite, then
# scripts/api-fuzz.sh (schemathesis against every OpenAPI document the services serve), then
# scripts/check-dashboards-live.sh (every Grafana panel has data on a local stack after demo traffic)
# and scripts/check-trace.sh (one trace across the four services in Jaeger, and Jaeger's UI serving
# it; skipped unless scripts/jaeger.sh has built Jaeger, and its UI, on this machine).
#
#   scripts/test.sh                 everything
#   scripts/test.sh -p relay        extra arguments go to `cargo test`
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

log() { printf '\033[1m[test]\033[0m %s\n' "$*" >&2; }

scripts/stack.sh deps

# Leftover databases of earlier runs: each test creates its own, named test_<uuid>.
psql -h 127.0.0.1 -U postgres -d postgres -Atqc "select datname from pg_database where datname like 'test\_%'" |
  while read -r db; do psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists \"$db\" with (force)" >/dev/null; done

VENV=${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay/test-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import aiosmtpd, standardwebhooks, schemathesis' 2>/dev/null; then
  log "installing Python test peers into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r scripts/test-requirements.txt
fi
export TEST_PYTHON=$VENV/bin/python
export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export TEST_KAFKA_BROKERS=${TEST_KAFKA_BROKERS:-127.0.0.1:9092}
export TEST_STACK_SCRIPT=$ROOT/scripts/stack.sh
export RUST_LOG=${RUST_LOG:-warn}

# The example services the end-to-end tests run as their own processes (examples/).
if [ ! -d examples/products/node_modules ] || [ examples/products/package-lock.json -nt examples/products/node_modules ]; then
  log "installing the Node example's dependencies (npm ci)"
  (cd examples/products && npm ci --no-audit --no-fund --loglevel=error)
fi
log "building the Go example"
mkdir -p target/examples
(cd examples/orders && go build -o "$ROOT/target/examples/orders" .)
export EXAMPLE_ORDERS_BIN=$ROOT/target/examples/orders

log "running the test suite"
# The whole suite also builds the benchmark binaries (and runs their unit tests), so that a
# change they depend on cannot break them unseen: `scripts/bench.sh` is not part of CI.
features=()
if [ $# -eq 0 ]; then features=(--features relay/bench); fi
cargo test --workspace "${features[@]}" "$@"

# Only for a whole-suite run: `scripts/test.sh -p relay` is about one crate.
if [ $# -eq 0 ]; then
  log "fuzzing the OpenAPI documents against the services"
  scripts/api-fuzz.sh
  log "checking that every dashboard panel has data on a running stack"
  scripts/check-dashboards-live.sh
  log "checking that one message makes one trace across the four services (skipped unless Jaeger is built)"
  scripts/check-trace.sh
fi
