#!/usr/bin/env bash
# Benchmarks (not tests): each prints a table that puts the product next to the physical limit
# measured in the same run on this machine.
#
#   scripts/bench.sh              relay and consumer
#   scripts/bench.sh relay [args] only the relay (args go to relay-bench, e.g. --events 500000)
#   scripts/bench.sh consumer [args]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/stack.sh deps
# wrk measures the webhook receiver's ceiling next to the consumer.
if ! command -v wrk >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null; } || true
fi
export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export TEST_KAFKA_BROKERS=${TEST_KAFKA_BROKERS:-127.0.0.1:9092}
which=${1:-all}
[ $# -gt 0 ] && shift
if [ "$which" = all ] || [ "$which" = relay ]; then
  cargo run --quiet --release -p relay --features bench --bin relay-bench -- "$@"
fi
if [ "$which" = all ] || [ "$which" = consumer ]; then
  cargo run --quiet --release -p consumer --bin consumer-bench -- "$@"
fi
