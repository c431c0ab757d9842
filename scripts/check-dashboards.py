#!/usr/bin/env python3
"""Lints the Grafana dashboards and Prometheus alert rules against the metrics contract.

Checks (each failure is printed; the exit status is 1 if any):
  dashboards (grafana/dashboards/*.json)
    - valid JSON with a fixed, unique `uid` and a title
    - a `datasource` template variable of type datasource (query prometheus); every panel and
      every target uses `${datasource}`
    - panel ids unique within the dashboard; every panel has a gridPos, a title and a unit
    - every metric name in every expr (and in label_values() of query variables) is one from
      docs/metrics.md (histograms also as _bucket/_sum/_count) or `up`
    - every range selector is [$__rate_interval]; every histogram_quantile groups by le
  alert rules (prometheus/alerts.yml)
    - the same metric-name check; every alert has `for`, a severity (critical|warning|info),
      and summary and description annotations
With --emit-rules FILE it also writes every dashboard expr as a recording rule (variables
replaced by plausible values), so `promtool check rules FILE` can check the PromQL syntax.
With --prometheus URL it also runs every panel query against that Prometheus (a running stack
after some traffic: scripts/test.sh does it) and fails on each one that returns no series, so no
panel shows "No data" on a healthy system.
"""
import argparse
import glob
import json
import os
import re
import sys
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Metrics from outside our services that dashboards and alerts may use.
EXTERNAL = {
    "up",  # Prometheus' own scrape health
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
            "and", "or", "unless", "inf", "nan", "le"}
SEVERITIES = {"critical", "warning", "info"}

errors = []


def error(where, msg):
    errors.append(f"{where}: {msg}")


def contract_metrics():
    """Metric names from the table in docs/metrics.md, histograms with their series suffixes."""
    names = set()
    with open(os.path.join(ROOT, "docs", "metrics.md")) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 3:
                continue
            m = re.fullmatch(r"`([a-z_:][a-z0-9_:]*)`", cells[1])
            if not m:
                continue
            names.add(m.group(1))
            if cells[2] == "histogram":
                names.update(m.group(1) + s for s in ("_bucket", "_sum", "_count"))
    if not names:
        error("docs/metrics.md", "no metric names found in the table")
    return names


def metric_names(expr):
    """The metric names an expression selects (a PromQL approximation good enough for a lint)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)                       # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                      # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", e)    # numbers
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", e):
        if m.group(1).lower() not in KEYWORDS:
            names.add(m.group(1))
    return names


def check_names(where, expr, known):
    for name in sorted(metric_names(expr) - known):
        error(where, f"unknown metric `{name}` in `{expr}`")


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def check_dashboard(path, known, uids, rules):
    where = os.path.relpath(path, ROOT)
    try:
        with open(path) as f:
            d = json.load(f)
    except ValueError as e:
        error(where, f"invalid JSON: {e}")
        return
    uid = d.get("uid")
    if not uid:
        error(where, "no fixed uid")
    elif uid in uids:
        error(where, f"uid {uid!r} also used by {uids[uid]}")
    else:
        uids[uid] = where
    if not d.get("title"):
        error(where, "no title")

    variables = d.get("templating", {}).get("list", [])
    ds_vars = [v for v in variables if v.get("name") == "datasource"]
    if not ds_vars or ds_vars[0].get("type") != "datasource" or ds_vars[0].get("query") != "prometheus":
        error(where, "no `datasource` template variable of type datasource (prometheus)")
    for v in variables:
        if v.get("type") == "query":
            query = v.get("query")
            query = query.get("query", "") if isinstance(query, dict) else (query or "")
            m = re.match(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", query)
            if m and m.group(1) not in known:
                error(where, f"variable {v.get('name')}: unknown metric `{m.group(1)}`")
            if (v.get("datasource") or {}).get("uid") != "${datasource}":
                error(where, f"variable {v.get('name')}: datasource is not ${{datasource}}")

    ids = set()
    n_targets = 0
    for p in walk_panels(d.get("panels", [])):
        pw = f"{where} panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids:
            error(pw, "duplicate panel id")
        ids.add(p.get("id"))
        if "gridPos" not in p:
            error(pw, "no gridPos")
        if p.get("type") == "row":
            continue
        if not p.get("title"):
            error(pw, "no title")
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            error(pw, "panel datasource is not ${datasource}")
        if not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            error(pw, "no unit")
        if not p.get("targets"):
            error(pw, "no targets")
        for t in p.get("targets", []):
            n_targets += 1
            expr = t.get("expr", "")
            tw = f"{pw} target {t.get('refId')}"
            if (t.get("datasource") or {}).get("uid") != "${datasource}":
                error(tw, "target datasource is not ${datasource}")
            if not expr:
                error(tw, "empty expr")
                continue
            check_names(tw, expr, known)
            for r in re.findall(r"\[([^\]]*)\]", expr):
                if r != "$__rate_interval":
                    error(tw, f"range [{r}] is not [$__rate_interval]")
            for m in re.finditer(r"histogram_quantile\(", expr):
                if not re.search(r"by \([^)]*\ble\b", expr[m.end():]):
                    error(tw, "histogram_quantile without `by (..., le)`")
            rules.append({
                "record": f"dashboard:{uid}:{p.get('id')}:{t.get('refId')}".replace("-", "_"),
                "expr": concrete(expr, "5m"),
                "panel": f"{where} panel {p.get('id')} {p.get('title')!r} target {t.get('refId')}",
            })
    print(f"  checked {where}: uid={uid} panels={len(ids)} targets={n_targets}")


def concrete(expr, rate_interval):
    """The expression with the dashboards' variables replaced: every endpoint, a fixed range."""
    return expr.replace("$__rate_interval", rate_interval).replace("$endpoint", ".*")


def check_live(prometheus, rules, rate_interval):
    """Runs every panel query at Prometheus; an empty answer is an error."""
    empty = 0
    for r in rules:
        expr = r["expr"].replace("[5m]", f"[{rate_interval}]")
        url = f"{prometheus.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                doc = json.load(answer)
        except Exception as e:  # noqa: BLE001 - any failure to ask is a failure of the check
            error(r["panel"], f"cannot query {prometheus}: {e}")
            continue
        result = doc.get("data", {}).get("result", [])
        if doc.get("status") != "success" or not result:
            empty += 1
            error(r["panel"], f"no data from Prometheus for `{expr}`")
    print(f"  queried {len(rules)} panel queries at {prometheus}: {len(rules) - empty} with data, {empty} empty")


def check_alerts(path, known):
    import yaml  # PyYAML; check-ops.sh installs it when missing

    where = os.path.relpath(path, ROOT)
    with open(path) as f:
        doc = yaml.safe_load(f)
    n = 0
    for g in doc.get("groups", []):
        for r in g.get("rules", []):
            if "alert" not in r:
                continue
            n += 1
            aw = f"{where} alert {r['alert']}"
            check_names(aw, r.get("expr", ""), known)
            if not r.get("for"):
                error(aw, "no `for`")
            if r.get("labels", {}).get("severity") not in SEVERITIES:
                error(aw, f"severity not one of {sorted(SEVERITIES)}")
            for a in ("summary", "description"):
                if not r.get("annotations", {}).get(a):
                    error(aw, f"no {a} annotation")
    print(f"  checked {where}: {n} alerts")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emit-rules", help="write dashboard exprs as recording rules to this file")
    ap.add_argument("--prometheus", help="also run every panel query at this Prometheus URL; empty answers fail")
    ap.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for with --prometheus")
    args = ap.parse_args()

    known = contract_metrics() | EXTERNAL
    print(f"  {len(known)} known metric names (docs/metrics.md + {sorted(EXTERNAL)})")
    uids, rules = {}, []
    paths = sorted(glob.glob(os.path.join(ROOT, "grafana", "dashboards", "*.json")))
    if not paths:
        error("grafana/dashboards", "no dashboards")
    for path in paths:
        check_dashboard(path, known, uids, rules)
    check_alerts(os.path.join(ROOT, "prometheus", "alerts.yml"), known)
    if args.emit_rules:
        with open(args.emit_rules, "w") as f:
            recording = [{"record": r["record"], "expr": r["expr"]} for r in rules]
            json.dump({"groups": [{"name": "dashboard-exprs", "rules": recording}]}, f, indent=1)
    if args.prometheus:
        check_live(args.prometheus, rules, args.rate_interval)
    for e in errors:
        print("  FAIL " + e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
