#!/usr/bin/env python3
"""Draws one trace from Jaeger's query API answer (GET /api/traces/{id}) as an HTML timeline, for
scripts/check-trace.sh --screenshot: one row per span, indented under its parent, coloured by
service, with its duration and outcome tags.

  trace-page.py trace.json [link] > trace.html
"""
import html
import json
import sys

COLOURS = {"producer": "#4e79a7", "relay": "#f28e2b", "consumer": "#59a14f", "notifier": "#e15759"}
TAGS = ("http.route", "http.response.status_code", "outcome", "attempt", "events", "topic", "event_id")

trace = json.load(open(sys.argv[1]))["data"][0]
link = sys.argv[2] if len(sys.argv) > 2 else ""
procs = {k: v["serviceName"] for k, v in trace["processes"].items()}
spans = {s["spanID"]: s for s in trace["spans"]}
children = {}
roots = []
for s in sorted(trace["spans"], key=lambda s: s["startTime"]):
    parent = next((r["spanID"] for r in s.get("references", []) if r["refType"] == "CHILD_OF" and r["spanID"] in spans), None)
    (children.setdefault(parent, []) if parent else roots).append(s)

start = min(s["startTime"] for s in trace["spans"])
end = max(s["startTime"] + s["duration"] for s in trace["spans"])
total = max(end - start, 1)
rows = []


def walk(s, depth):
    rows.append((s, depth))
    for c in children.get(s["spanID"], []):
        walk(c, depth + 1)


for r in roots:
    walk(r, 0)

out = [f"""<!doctype html><meta charset="utf-8"><title>trace {trace['traceID']}</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 16px 20px; color: #222; }}
h1 {{ font-size: 17px; margin: 0 0 4px; }} .sub {{ color: #666; margin-bottom: 12px; }}
.row {{ display: flex; align-items: center; height: 24px; border-bottom: 1px solid #eee; }}
.name {{ width: 430px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }}
.svc {{ display: inline-block; width: 70px; font-weight: 600; }}
.lane {{ position: relative; flex: 1; height: 14px; background: #fafafa; }}
.bar {{ position: absolute; height: 14px; border-radius: 2px; min-width: 2px; }}
.dur {{ width: 80px; text-align: right; color: #555; }}
.tags {{ width: 300px; padding-left: 10px; color: #666; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }}
.legend span {{ display: inline-block; margin-right: 14px; }} .legend i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; }}
</style>
<h1>Trace {trace['traceID']} &middot; {len(trace['spans'])} spans &middot; {total / 1000:.1f} ms</h1>
<div class="sub">from Jaeger's query API ({html.escape(link)}) &middot; POST /messages &rarr; producer transaction &rarr; relay &rarr; Kafka &rarr; consumer &rarr; webhook attempts &rarr; notifier</div>
<div class="legend">""" + "".join(f'<span><i style="background:{c}"></i>{n}</span>' for n, c in COLOURS.items()) + "</div>"]
for s, depth in rows:
    svc = procs[s["processID"]]
    tags = {t["key"]: t["value"] for t in s.get("tags", [])}
    shown = " ".join(f"{k}={tags[k]}" for k in TAGS if k in tags)
    left = (s["startTime"] - start) / total * 100
    width = s["duration"] / total * 100
    out.append(
        f'<div class="row"><div class="name" style="padding-left:{depth * 14}px"><span class="svc" style="color:{COLOURS.get(svc, "#333")}">{svc}</span>'
        f'{html.escape(s["operationName"])}</div><div class="lane"><div class="bar" style="left:{left:.3f}%;width:{width:.3f}%;background:{COLOURS.get(svc, "#999")}"></div></div>'
        f'<div class="dur">{s["duration"] / 1000:.2f} ms</div><div class="tags">{html.escape(shown)}</div></div>'
    )
print("\n".join(out))
