#!/usr/bin/env python3
"""Turns a benchmark's results.json into table.md and PNG plots in the same folder.

    bench-report.py DIR [VERSIONS]

results.json (written by debezium-bench, producer-bench, e2e-bench) holds:
  section, title, cores, unit, throughput: [{name, value}], latency_title,
  latency: [{system, offered, achieved, events, p50, p99, max, and optionally warm_up_events,
  p99_with_warm_up and timeline: [[seconds from the warm-up's end, p50, p99, max, events], ...]}],
  counts: [...], goals: [{goal, met, measured}]
VERSIONS (a line such as "PostgreSQL 15.18, Kafka 4.1.1") goes under the title and on the plots.
The plots need matplotlib; without it only table.md is written.
"""
import json
import sys
from pathlib import Path


def fmt(v, digits=0):
    if v is None:
        return ""
    if isinstance(v, float) and v != v:  # NaN
        return "n/a"
    return f"{v:,.{digits}f}"


def markdown_table(columns, rows):
    """The lines of a markdown table and a blank line: `columns` are (heading, alignment) pairs,
    the alignment `---`, `---:` or `:---:`; each row is a list of cells, one a column."""
    lines = ["| " + " | ".join(heading for heading, _ in columns) + " |",
             "| " + " | ".join(align for _, align in columns) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def table(result, versions):
    lines = [f"### {result['title']}", ""]
    lines.append(f"{result['cores']} cores; {versions}" if versions else f"{result['cores']} cores")
    lines.append("")
    unit = result.get("unit", "per second")
    number = "---:"
    if result.get("throughput"):
        rows = [[t["name"], fmt(t["value"])] for t in result["throughput"]]
        rows += [[t["name"], t["value"]] for t in result.get("ratios", [])]
        lines += markdown_table([("throughput", "---"), (unit, number)], rows)
    if result.get("latency"):
        warmed = any("p99_with_warm_up" in r for r in result["latency"])
        headings = ["offered/s", "achieved/s", "events", "failed writes", "p50 ms", "p99 ms", "max ms"]
        if warmed:
            headings += ["warm-up events", "p99 ms with them"]
        columns = [(result.get("latency_title", "latency"), "---")] + [
            (heading, number) for heading in headings]
        rows = [[r["system"], fmt(r["offered"]), fmt(r.get("achieved")), fmt(r.get("events")),
                 fmt(r.get("failed_writes", 0)), fmt(r["p50"], 1), fmt(r["p99"], 1),
                 fmt(r.get("max"), 1)]
                + ([fmt(r.get("warm_up_events")), fmt(r.get("p99_with_warm_up"), 1)] if warmed else [])
                for r in result["latency"]]
        lines += markdown_table(columns, rows)
    if result.get("counts"):
        columns = [("counted back", "---")] + [
            (heading, number) for heading in
            ["expected", "once", "duplicates", "missing", "unexpected", "mean bytes"]]
        rows = [[c["what"], fmt(c["expected"]), fmt(c["unique"]), fmt(c["duplicates"]),
                 fmt(c["missing"]), fmt(c["unexpected"]), fmt(c.get("mean_bytes"))]
                for c in result["counts"]]
        lines += markdown_table(columns, rows)
    if result.get("goals"):
        rows = [[g["goal"], g.get("measured", ""), "yes" if g["met"] else "**no**"]
                for g in result["goals"]]
        lines += markdown_table([("goal", "---"), ("measured", "---"), ("met", ":---:")], rows)
    return "\n".join(lines)


def plots(result, versions, folder):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench-report: matplotlib is missing, no plots", file=sys.stderr)
        return []
    footer = f"{result['cores']} cores" + (f"; {versions}" if versions else "")
    written = []

    def save(fig, ax, title, name):
        ax.set_title(title, fontsize=10)
        fig.text(0.01, 0.01, footer, fontsize=8, color="#555")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        path = folder / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if result.get("throughput"):
        names = [t["name"] for t in result["throughput"]]
        values = [t["value"] for t in result["throughput"]]
        fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 1.8))
        bars = ax.barh(names[::-1], values[::-1], color="#4c72b0")
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values[::-1]], padding=3)
        ax.set_xlabel(result.get("unit", "per second"))
        ax.set_xlim(0, max(values) * 1.18 if values else 1)
        save(fig, ax, result["title"], "throughput.png")
    if result.get("latency"):
        fig, ax = plt.subplots(figsize=(8, 4.8))
        systems = []
        for r in result["latency"]:
            if r["system"] not in systems:
                systems.append(r["system"])
        for i, system in enumerate(systems):
            rows = sorted((r for r in result["latency"] if r["system"] == system), key=lambda r: r["offered"])
            x = [r["offered"] for r in rows]
            color = f"C{i}"
            ax.plot(x, [r["p50"] for r in rows], "o--", color=color, label=f"{system} p50")
            ax.plot(x, [r["p99"] for r in rows], "s-", color=color, label=f"{system} p99")
        ax.set_xscale("log")
        ax.set_yscale("log")
        from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter
        offered = sorted({r["offered"] for r in result["latency"]})
        ax.xaxis.set_major_locator(FixedLocator(offered))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("offered rate, events/s")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, ax, result.get("latency_title", "latency"), "latency.png")
    timed = [r for r in result.get("latency", []) if r.get("timeline")]
    if timed:
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
        rates = sorted({r["offered"] for r in timed})
        systems = []
        for r in timed:
            if r["system"] not in systems:
                systems.append(r["system"])
        fig, axes = plt.subplots(len(rates), 1, figsize=(9, 2.3 * len(rates) + 0.8), sharex=True,
                                 squeeze=False)
        for ax, rate in zip(axes[:, 0], rates):
            for i, system in enumerate(systems):
                for r in timed:
                    if r["system"] == system and r["offered"] == rate:
                        # The last window holds the few commits after the last full one.
                        full = [w for w in r["timeline"] if len(w) < 5 or w[4] >= 10]
                        t = [w[0] for w in full]
                        ax.plot(t, [w[2] for w in full], "-", color=f"C{i}", lw=1.2,
                                label=f"{system} p99")
                        ax.plot(t, [w[3] for w in full], ":", color=f"C{i}", lw=0.8,
                                label=f"{system} max")
            ax.axvspan(min(min(w[0] for w in r["timeline"]) for r in timed), 0, color="#ddd",
                       alpha=0.6, lw=0)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel(f"{rate:,}/s, ms", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
        axes[0, 0].legend(fontsize=7, ncol=2 * len(systems), loc="upper right")
        axes[-1, 0].set_xlabel("seconds after the warm-up (shaded: warm-up, not in the table's p50/p99/max)")
        save(fig, axes[0, 0], "commit to record, per 250 ms of commits", "timeline.png")
    return written


def main():
    folder = Path(sys.argv[1])
    versions = sys.argv[2] if len(sys.argv) > 2 else ""
    result = json.loads((folder / "results.json").read_text())
    result["versions"] = versions
    (folder / "results.json").write_text(json.dumps(result, indent=2))
    text = table(result, versions)
    (folder / "table.md").write_text(text + "\n")
    print(text)
    for path in plots(result, versions, folder):
        print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
