#!/usr/bin/env bash
# Checks the operations-as-code: Prometheus configs, alert rules and their unit tests, Grafana
# dashboards and provisioning, docker-compose.yml. Installs promtool (Debian package
# `prometheus`) and PyYAML when missing. Needs no running service.
#
#   scripts/check-ops.sh          exit status 0 when every check passes
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
failures=0
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

log() { printf '\n==> %s\n' "$*"; }
check() { # check "what" command...
  log "$1"; shift
  if "$@"; then echo "    ok"; else echo "    FAILED: $*"; failures=$((failures + 1)); fi
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v promtool >/dev/null; then
  log "installing promtool (Debian package prometheus)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
  log "installing PyYAML"
  python3 -m pip install -q pyyaml
fi
echo "promtool: $(promtool --version 2>&1 | head -1)"

check "Prometheus config for the local stack parses (prometheus/prometheus.yml, with its rule files)" \
  promtool check config prometheus/prometheus.yml
check "Prometheus config for docker-compose parses (prometheus/prometheus.docker.yml)" \
  promtool check config prometheus/prometheus.docker.yml
check "alert rules parse (prometheus/alerts.yml)" \
  promtool check rules prometheus/alerts.yml
check "alert rules pass their unit tests (prometheus/alerts.test.yml)" \
  promtool test rules prometheus/alerts.test.yml
check "dashboards and alerts follow the metrics contract (scripts/check-dashboards.py: JSON, uids, panel ids, units, \${datasource}, metric names from docs/metrics.md, [\$__rate_interval]; alerts: for, severity, annotations)" \
  python3 scripts/check-dashboards.py --emit-rules "$TMP/dashboard-exprs.json"
check "every dashboard expression is valid PromQL (as recording rules through promtool)" \
  promtool check rules "$TMP/dashboard-exprs.json"

check_provisioning_and_compose() {
  python3 - <<'EOF'
import json, sys, yaml

def fail(msg):
    print("    " + msg); sys.exit(1)

ds = yaml.safe_load(open("grafana/provisioning/datasources/prometheus.yaml"))
if ds.get("apiVersion") != 1: fail("datasources: apiVersion is not 1")
uids = [d.get("uid") for d in ds.get("datasources", [])]
if "prometheus" not in uids: fail(f"datasources: no uid 'prometheus' (have {uids})")
dash = yaml.safe_load(open("grafana/provisioning/dashboards/dashboards.yaml"))
if dash.get("apiVersion") != 1: fail("dashboards provider: apiVersion is not 1")
prov = [p for p in dash.get("providers", []) if p.get("type") == "file" and p.get("options", {}).get("path")]
if not prov: fail("dashboards provider: no file provider with options.path")
print(f"    grafana provisioning: datasource uids {uids}, providers {[p['name'] for p in prov]}")

compose = yaml.safe_load(open("docker-compose.yml"))
svcs = compose["services"]
want = {"postgres", "kafka", "jaeger", "prometheus", "grafana", "producer", "relay", "consumer", "notifier"}
if want - set(svcs): fail(f"docker-compose.yml: missing services {sorted(want - set(svcs))}")
for name in ("producer", "relay", "consumer", "notifier"):
    s = svcs[name]
    if s.get("command") != [name]: fail(f"{name}: command is not [{name!r}]")
    if "/health" not in " ".join(s.get("healthcheck", {}).get("test", [])): fail(f"{name}: no /health healthcheck")
    if not str(s.get("environment", {}).get("LISTEN_ADDR", "")).startswith("0.0.0.0:"): fail(f"{name}: LISTEN_ADDR not 0.0.0.0")
    for dep, cond in (s.get("depends_on") or {}).items():
        if not cond.get("condition"): fail(f"{name}: depends_on {dep} without condition")
for name, s in svcs.items():
    for port in s.get("ports", []):
        if not str(port).startswith("127.0.0.1:"):
            fail(f"{name}: port {port} is published on every interface, not 127.0.0.1")
endpoints = json.load(open("deploy/endpoints.json"))
for e in endpoints:
    missing = {"id", "url", "event_types", "description", "secret"} - set(e)
    if missing: fail(f"deploy/endpoints.json: {e.get('id')} lacks {sorted(missing)}")
secret = svcs["notifier"]["environment"]["WEBHOOK_SECRET"]
default = secret.split(":-", 1)[1].rstrip("}") if ":-" in secret else secret
if not any(e["secret"] in default.split(",") for e in endpoints):
    fail("deploy/endpoints.json: no endpoint secret is among the notifier's WEBHOOK_SECRET")
print(f"    docker-compose.yml: {len(svcs)} services; deploy/endpoints.json: {len(endpoints)} endpoint(s), secret matches the notifier")
EOF
}
check "Grafana provisioning, docker-compose.yml and deploy/endpoints.json are consistent YAML/JSON" \
  check_provisioning_and_compose

if docker compose version >/dev/null 2>&1; then
  check "docker compose config accepts docker-compose.yml" docker compose config -q
else
  log "docker compose is not available here: skipping 'docker compose config' (the YAML check above still ran)"
fi

echo
if [ "$failures" -gt 0 ]; then
  echo "check-ops: $failures check(s) FAILED"
  exit 1
fi
echo "check-ops: all checks passed"
