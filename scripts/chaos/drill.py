#!/usr/bin/env python3
"""The chaos drill's driver (scripts/chaos.sh starts it; see `scripts/chaos.sh --help`).

Against a running stack (scripts/stack.sh, located by the environment chaos.sh passes on): starts
two receivers of its own and subscribes them to every event, posts steady traffic through the
producer's `POST /messages`, runs the fault schedule under that traffic, waits for everything to
drain (bounded), then counts per receiver as Jepsen's total-queue checker does:

    attempted     every message a request was sent for (its token is in the message's content)
    acknowledged  the producer answered 201
    received      the receiver accepted it with 200, signature verified (distinct tokens)
    lost          acknowledged - received          (must be empty)
    unexpected    received - attempted             (must be empty)
    duplicates    deliveries accepted beyond the first one of each token (allowed: at least once)

It writes summary.json, timeline.png, samples.csv and the receivers' logs into the results folder,
prints a summary table, and exits 1 if anything was lost or unexpected (2 on a setup failure).
"""

import argparse
import base64
import csv
import http.client
import json
import os
import queue
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ALL_FAULTS = ["kafka", "broker", "relay", "consumer", "receiver", "postgres"]
FAULT_HELP = {
    "kafka": "every Kafka node stopped (kafka-stop), started again after --kafka-down",
    "broker": "one broker SIGKILLed (broker-stop N --kill), started after --broker-down (3+ nodes)",
    "relay": "the leading relay SIGKILLed (kill relay-leader); a standby takes over; restarted after --relay-down",
    "consumer": "a consumer SIGKILLed mid-batch (kill consumer N), started after --consumer-down",
    "receiver": "the failing receiver answers 503 for --receiver-down (its breaker opens, holds, closes)",
    "postgres": "PostgreSQL stopped and started again after --pg-down (only a PostgreSQL the stack runs)",
}


def duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (write 250ms, 30s, 5m)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def log(msg: str):
    print(f"\033[1m[chaos]\033[0m {msg}", file=sys.stderr, flush=True)


def fail(msg: str):
    """The drill cannot run as asked: exit 2 (1 means something was lost)."""
    log(f"error: {msg}")
    sys.exit(2)


class Stack:
    """scripts/stack.sh with the drill's environment."""

    def __init__(self, script: str, logfile):
        self.script = script
        self.logfile = logfile

    def run(self, *args: str, check: bool = True) -> str:
        started = time.time()
        p = subprocess.run(["bash", self.script, *args], capture_output=True, text=True)
        self.logfile.write(f"--- {time.strftime('%H:%M:%S')} stack.sh {' '.join(args)} "
                           f"({time.time() - started:.1f}s, rc {p.returncode})\n{p.stderr}{p.stdout}")
        self.logfile.flush()
        if check and p.returncode != 0:
            raise RuntimeError(f"stack.sh {' '.join(args)} failed: {p.stderr.strip().splitlines()[-1:]}")
        return p.stdout.strip()

    def url(self, service: str, n: int = 1) -> str:
        return self.run("url", service, str(n))


def http_json(method: str, url: str, body=None, timeout: float = 2.0, token: str = ""):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read()
        return r.status, (json.loads(text) if text else None)


def http_text(url: str, timeout: float = 1.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric_sum(text: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ") and label in line:
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total


# ---------------------------------------------------------------- receivers
@dataclass
class ReceiverState:
    name: str
    log_path: str
    url: str = ""
    endpoint_id: str = ""
    offset: int = 0
    first_seen: dict = field(default_factory=dict)  # token -> time of first acceptance
    accepted: Counter = field(default_factory=Counter)  # token -> acceptances
    accepted_times: list = field(default_factory=list)
    failing_times: list = field(default_factory=list)
    bad_signatures: int = 0
    foreign: int = 0  # accepted events that are not this run's messages

    def tail(self, prefix: str):
        """Reads what the receiver logged since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].decode().splitlines():
            t, outcome, token, _wid = (line.split("\t") + ["", "", "", ""])[:4]
            t = float(t)
            if outcome == "accepted":
                self.accepted_times.append(t)
                if not token.startswith(prefix):
                    self.foreign += 1
                    continue
                self.accepted[token] += 1
                self.first_seen.setdefault(token, t)
            elif outcome == "failing":
                self.failing_times.append(t)
            elif outcome == "bad_signature":
                self.bad_signatures += 1


def start_receiver(name: str, secret: str, results: str, python: str):
    log_path = os.path.join(results, f"receiver-{name}.tsv")
    port_file = os.path.join(results, f"receiver-{name}.port")
    for stale in (port_file, log_path):
        if os.path.exists(stale):
            os.remove(stale)
    proc = subprocess.Popen(
        [python, os.path.join(HERE, "receiver.py"), "--name", name, "--secret", secret,
         "--log", log_path, "--port-file", port_file],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(results, f"receiver-{name}.err"), "w"))
    deadline = time.time() + 10
    while not os.path.exists(port_file):
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError(f"receiver {name} did not start")
        time.sleep(0.05)
    port = int(open(port_file).read())
    rx = ReceiverState(name=name, log_path=log_path, url=f"http://127.0.0.1:{port}")
    return proc, rx


# ---------------------------------------------------------------- traffic
class Traffic:
    """Steady POST /messages at `rate` per second from `workers` keep-alive connections."""

    def __init__(self, producer_url: str, rate: float, workers: int, prefix: str):
        self.host, self.port = producer_url.removeprefix("http://").split(":")
        self.rate = rate
        self.workers = workers
        self.prefix = prefix
        self.queue: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.attempted: dict = {}  # token -> time the request was sent
        self.acked: dict = {}  # token -> time the 201 arrived
        self.answers: Counter = Counter()  # status (0: no answer) -> count
        self.events = []  # (time, ok) per finished request, for the timeline
        self.threads = []

    def start(self):
        self.t0 = time.time()
        self.threads = [threading.Thread(target=self._schedule, daemon=True)]
        self.threads += [threading.Thread(target=self._work, daemon=True) for _ in range(self.workers)]
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)

    def _schedule(self):
        i = 0
        while not self.stop.is_set():
            due = self.t0 + i / self.rate
            now = time.time()
            if due > now:
                time.sleep(min(due - now, 0.1))
                continue
            self.queue.put(i)
            i += 1

    def _work(self):
        conn = None
        while not self.stop.is_set():
            try:
                seq = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            token = f"{self.prefix}{seq}"
            body = json.dumps({"content": token, "key": f"drill-key-{seq % 64}"})
            with self.lock:
                self.attempted[token] = time.time()
            status = 0
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, int(self.port), timeout=5)
                conn.request("POST", "/messages", body, {"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                status = r.status
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            now = time.time()
            with self.lock:
                self.answers[status] += 1
                self.events.append((now, status == 201))
                if status == 201:
                    self.acked[token] = now

    def acked_before(self, t: float) -> list:
        with self.lock:
            return [tok for tok, at in self.acked.items() if at <= t]


# ---------------------------------------------------------------- sampling
class Sampler:
    """Once a second: outbox backlog, consumer lag, breaker state, receivers' logs."""

    def __init__(self, args, stack: Stack, receivers, traffic: Traffic):
        self.args = args
        self.stack = stack
        self.receivers = receivers
        self.traffic = traffic
        self.samples = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.consumer_urls = [stack.url("consumer", n) for n in range(1, args.consumers + 1)]
        self.relay_urls = [stack.url("relay", n) for n in range(1, args.relays + 1)]
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()

    def finish(self):
        self.stop.set()
        self.thread.join(timeout=10)
        self.tail()

    def tail(self):
        with self.lock:
            for rx in self.receivers.values():
                rx.tail(self.traffic.prefix)

    def unsent(self):
        try:
            out = subprocess.run(
                ["psql", self.args.database_url, "-Atqc",
                 "select count(*) filter (where state = 'P'), count(*) filter (where state = 'X'),"
                 " count(*) filter (where state = 'D') from outbox.outbox"],
                capture_output=True, text=True, timeout=3,
                env={**os.environ, "PGCONNECT_TIMEOUT": "1"})
            p, x, d = (int(v) for v in out.stdout.strip().split("|"))
            return p, x, d
        except (subprocess.SubprocessError, ValueError):
            return None

    def lag(self):
        total, seen = 0.0, False
        for url in self.consumer_urls:
            try:
                total += metric_sum(http_text(f"{url}/metrics"), "consumer_lag_records")
                seen = True
            except (OSError, urllib.error.URLError):
                pass
        return total if seen else None

    def breaker(self):
        endpoint = self.receivers["failing"].endpoint_id
        for url in self.consumer_urls:
            try:
                _, body = http_json("GET", f"{url}/circuit-breakers", timeout=1, token=self.args.admin_token)
            except (OSError, urllib.error.URLError, ValueError):
                continue
            items = body if isinstance(body, list) else (body or {}).get("circuit_breakers") or (body or {}).get("items") or []
            for b in items:
                if b.get("endpoint_id") == endpoint:
                    return b.get("state")
            return "CLOSED"
        return None

    def leader(self):
        for n, url in enumerate(self.relay_urls, 1):
            try:
                if "relay_is_leader 1" in http_text(f"{url}/metrics").splitlines():
                    return n
            except (OSError, urllib.error.URLError):
                pass
        return None

    def _run(self):
        while not self.stop.is_set():
            started = time.time()
            self.tail()
            backlog = self.unsent()
            row = {
                "t": started,
                "outbox_p": backlog[0] if backlog else None,
                "outbox_x": backlog[1] if backlog else None,
                "outbox_d": backlog[2] if backlog else None,
                "lag": self.lag(),
                "breaker": self.breaker(),
                "leader": self.leader(),
            }
            with self.lock:
                self.samples.append(row)
            self.stop.wait(max(0.0, 1.0 - (time.time() - started)))

    def received_all(self, rx_name: str, tokens) -> bool:
        self.tail()
        seen = self.receivers[rx_name].first_seen
        return all(t in seen for t in tokens)


# ---------------------------------------------------------------- faults
@dataclass
class Window:
    name: str
    start: float
    end: float
    receiver: str = "healthy"
    note: str = ""
    recovery: float | None = None


class Faults:
    def __init__(self, args, stack: Stack, receivers, log_fn=log):
        self.args = args
        self.stack = stack
        self.receivers = receivers
        self.log = log_fn

    def leader(self):
        try:
            return int(self.stack.run("leader"))
        except (RuntimeError, ValueError):
            return None

    def _down_for(self, window, stop, start_again, down, what):
        """Runs `stack.sh *stop`, logs `what`, waits `down` seconds and runs `stack.sh *start_again`:
        the fault's window, named `window`, lasts from the stop to the start."""
        start = time.time()
        self.stack.run(*stop)
        self.log(f"{what}; down for {down:g}s")
        time.sleep(down)
        self.stack.run(*start_again)
        return Window(window, start, time.time())

    def kafka(self):
        return self._down_for("kafka stopped", ["kafka-stop"], ["kafka-start"],
                              self.args.kafka_down, "Kafka stopped (every node)")

    def broker(self):
        n = self.args.broker_victim
        return self._down_for(f"broker {n} killed", ["broker-stop", str(n), "--kill"],
                              ["broker-start", str(n)], self.args.broker_down,
                              f"Kafka node {n} SIGKILLed")

    def relay(self):
        victim = self.leader()
        start = time.time()
        self.stack.run("kill", "relay-leader")
        self.log(f"relay {victim} (the leader) SIGKILLed")
        note = ""
        if self.args.relays == 1:
            time.sleep(self.args.relay_down)
            self.stack.run("start", "relay", str(victim))
        deadline = time.time() + 60
        while (leader := self.leader()) is None and time.time() < deadline:
            time.sleep(0.2)
        end = time.time()
        note = f"relay {leader} leads {end - start:.1f}s after the kill"
        self.log(note)
        if self.args.relays > 1:
            threading.Thread(target=self._restart_later, args=("relay", victim, self.args.relay_down), daemon=True).start()
        return Window("relay leader killed", start, end, note=note)

    def _restart_later(self, service, n, delay):
        time.sleep(delay)
        try:
            self.stack.run("start", service, str(n))
            self.log(f"{service} {n} started again")
        except RuntimeError as e:
            self.log(f"could not restart {service} {n}: {e}")

    def consumer(self):
        n = self.args.consumer_victim
        return self._down_for(f"consumer {n} killed", ["kill", "consumer", str(n)],
                              ["start", "consumer", str(n)], self.args.consumer_down,
                              f"consumer {n} SIGKILLed")

    def receiver(self):
        rx = self.receivers["failing"]
        start = time.time()
        http_json("POST", f"{rx.url}/_drill/fail", {"seconds": self.args.receiver_down})
        self.log(f"receiver 'failing' answers 503 for {self.args.receiver_down:g}s")
        time.sleep(self.args.receiver_down)
        return Window("receiver 503", start, time.time(), receiver="failing")

    def postgres(self):
        return self._down_for("postgres restarted", ["pg-stop"], ["pg-start"],
                              self.args.pg_down, "PostgreSQL stopped")


def plan_faults(args) -> list:
    chosen = [f.strip() for f in args.faults.split(",") if f.strip()] if args.faults else list(ALL_FAULTS)
    skipped = {f.strip() for f in args.skip.split(",") if f.strip()}
    for f in chosen + sorted(skipped):
        if f not in ALL_FAULTS:
            fail(f"unknown fault {f!r} (known: {', '.join(ALL_FAULTS)})")
    plan = [f for f in chosen if f not in skipped]
    if "broker" in plan and args.brokers < 3:
        if args.faults:
            fail("the broker fault needs --brokers 3 (one node of one is the kafka fault)")
        plan.remove("broker")
    if "postgres" in plan and not args.pg_managed:
        log("skipping the postgres fault: this PostgreSQL is not run by scripts/stack.sh")
        plan.remove("postgres")
    return plan


# ---------------------------------------------------------------- accounting
def longest_gap(times, lo, hi):
    """Longest interval in [lo, hi] without a time from `times`."""
    pts = sorted(t for t in times if lo <= t <= hi)
    edges = [lo] + pts + [hi]
    best, at = 0.0, lo
    for a, b in zip(edges, edges[1:]):
        if b - a > best:
            best, at = b - a, a
    return best, at


def account(traffic: Traffic, receivers, t0: float, t_end: float):
    attempted = set(traffic.attempted)
    acked = set(traffic.acked)
    out = {}
    for name, rx in receivers.items():
        received = set(rx.accepted)
        lost = sorted(acked - received, key=lambda t: int(t.rsplit("-", 1)[1]))
        unexpected = sorted(received - attempted)
        stall, stall_at = longest_gap(rx.first_seen.values(), min(traffic.acked.values(), default=t0), max(rx.first_seen.values(), default=t_end))
        out[name] = {
            "attempted": len(attempted),
            "acknowledged": len(acked),
            "received": len(received),
            "lost": len(lost),
            "unexpected": len(unexpected),
            "duplicates": sum(c - 1 for c in rx.accepted.values()),
            "duplicated_events": sum(1 for c in rx.accepted.values() if c > 1),
            "received_unacknowledged": len((received & attempted) - acked),
            "answered_503": len(rx.failing_times),
            "bad_signatures": rx.bad_signatures,
            "foreign_events": rx.foreign,
            "longest_stall_s": round(stall, 1),
            "longest_stall_at_s": round(stall_at - t0, 1),
            "lost_tokens": lost[:50],
            "unexpected_tokens": unexpected[:50],
        }
    return out


# ---------------------------------------------------------------- output
def per_second(times, t0, n):
    bins = [0] * n
    for t in times:
        i = int(t - t0)
        if 0 <= i < n:
            bins[i] += 1
    return bins


def plot(path, t0, t_end, traffic, sampler, receivers, windows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(t_end - t0) + 1
    xs = list(range(n))
    ok = per_second([t for t, good in traffic.events if good], t0, n)
    bad = per_second([t for t, good in traffic.events if not good], t0, n)
    st = [s["t"] - t0 for s in sampler.samples]
    fig, ax = plt.subplots(5, 1, figsize=(13, 12), sharex=True)
    ax[0].plot(xs, ok, color="tab:blue", lw=1, label="201 acknowledged")
    ax[0].plot(xs, bad, color="tab:red", lw=1, label="not acknowledged")
    ax[0].set_ylabel("POST /messages\nper second")
    unsent = [None if s["outbox_p"] is None else s["outbox_p"] + s["outbox_x"] for s in sampler.samples]
    xrows = [s["outbox_x"] for s in sampler.samples]
    ax[1].plot(st, unsent, color="tab:purple", lw=1, label="unsent (P + X)")
    ax[1].plot(st, xrows, color="tab:orange", lw=1, label="X (failed, retried)")
    ax[1].set_ylabel("outbox rows")
    ax[2].plot(st, [s["lag"] for s in sampler.samples], color="tab:green", lw=1)
    ax[2].set_ylabel("consumer lag\n(records)")
    colors = {"healthy": "tab:blue", "failing": "tab:brown"}
    for name, rx in receivers.items():
        ax[3].plot(xs, per_second(rx.accepted_times, t0, n), lw=1, color=colors.get(name), label=f"{name}: accepted")
    ax[3].plot(xs, per_second(receivers["failing"].failing_times, t0, n), lw=1, color="tab:red", ls=":", label="failing: answered 503")
    ax[3].set_ylabel("deliveries\nper second")
    level = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}
    ax[4].step(st, [level.get(s["breaker"]) for s in sampler.samples], where="post", color="tab:red", lw=1.2)
    ax[4].set_yticks([0, 1, 2], ["closed", "half-open", "open"])
    ax[4].set_ylabel("breaker of\n'failing'")
    ax[4].set_xlabel("seconds since traffic started")
    for a in ax:
        for w in windows:
            a.axvspan(w.start - t0, max(w.end, w.start + 0.5) - t0, color="tab:red", alpha=0.12)
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(loc="upper right", fontsize=8)
    for w in windows:
        ax[0].annotate(w.name, xy=(w.start - t0, 1.0), xycoords=("data", "axes fraction"),
                       xytext=(2, 2), textcoords="offset points", fontsize=8, rotation=20, va="bottom")
    ax[0].set_title(title, pad=38)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def table(summary) -> str:
    tr = summary["traffic"]
    lines = [f"traffic: {tr['attempted']} attempted in {tr['duration_s']:g}s ({tr['achieved_rate_per_s']:g}/s of "
             f"{tr['rate_per_s']:g}/s asked), {tr['acknowledged']} acknowledged; answers {tr['answers']}; "
             f"longest time without a 201: {tr['longest_gap_without_201_s']:g}s", ""]
    cols = ["attempted", "acknowledged", "received", "lost", "unexpected", "duplicates", "longest_stall_s"]
    lines.append(f"{'receiver':<9} " + " ".join(f"{c:>15}" for c in cols))
    for name, r in summary["receivers"].items():
        lines.append(f"{name:<9} " + " ".join(f"{r[c]:>15}" for c in cols))
    lines.append("")
    lines.append(f"{'fault':<22} {'window (s)':>16} {'lasted':>8} {'recovered after':>16}  note")
    for f in summary["faults"]:
        rec = "—" if f["recovery_s"] is None else f"{f['recovery_s']:.1f}s"
        lines.append(f"{f['name']:<22} {f['started_s']:>7.1f}–{f['ended_s']:<8.1f} {f['duration_s']:>7.1f}s {rec:>16}  {f['note']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description="chaos drill driver (use scripts/chaos.sh)")
    ap.add_argument("--stack-script", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--admin-token", default=os.environ.get("ADMIN_TOKEN", ""))
    ap.add_argument("--brokers", type=int, default=1)
    ap.add_argument("--relays", type=int, default=1)
    ap.add_argument("--consumers", type=int, default=1)
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--duration", type=duration, default=duration("4m"))
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--faults", default="")
    ap.add_argument("--skip", default="")
    ap.add_argument("--warmup", type=duration, default=duration("10s"))
    ap.add_argument("--gap", type=duration, default=duration("10s"))
    ap.add_argument("--kafka-down", type=duration, default=duration("30s"))
    ap.add_argument("--broker-down", type=duration, default=duration("30s"))
    ap.add_argument("--broker-victim", type=int, default=2)
    ap.add_argument("--relay-down", type=duration, default=duration("5s"))
    ap.add_argument("--consumer-victim", type=int, default=1)
    ap.add_argument("--consumer-down", type=duration, default=duration("5s"))
    ap.add_argument("--receiver-down", type=duration, default=duration("20s"))
    ap.add_argument("--pg-down", type=duration, default=duration("5s"))
    ap.add_argument("--recovery-timeout", type=duration, default=duration("2m"))
    ap.add_argument("--drain-timeout", type=duration, default=duration("3m"))
    ap.add_argument("--pg-managed", action="store_true")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()

    os.makedirs(args.results, exist_ok=True)
    stack_log = open(os.path.join(args.results, "stack.log"), "a")
    stack = Stack(args.stack_script, stack_log)
    plan = plan_faults(args)
    if args.broker_victim > args.brokers and "broker" in plan:
        fail(f"--broker-victim {args.broker_victim}: the cluster has {args.brokers} nodes")
    if args.consumer_victim > args.consumers and "consumer" in plan:
        fail(f"--consumer-victim {args.consumer_victim}: the stack runs {args.consumers} consumers")
    run_id = secrets.token_hex(4)
    prefix = f"chaos-{run_id}-"
    log(f"run {run_id}: {args.rate:g} messages/s for at least {args.duration:g}s; faults: {', '.join(plan) or 'none'}")

    producer = stack.url("producer")
    consumer = stack.url("consumer")
    receivers, procs = {}, []
    try:
        for name in ("healthy", "failing"):
            secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
            proc, rx = start_receiver(name, secret, args.results, args.python)
            procs.append(proc)
            _, body = http_json("POST", f"{consumer}/endpoints", {
                "url": f"{rx.url}/webhooks/{name}", "event_types": ["*"], "secret": secret,
                "description": f"chaos drill {run_id}: {name} receiver"}, token=args.admin_token, timeout=10)
            rx.endpoint_id = body["id"]
            receivers[name] = rx
            log(f"receiver '{name}' on {rx.url}, endpoint {rx.endpoint_id}")
    except (OSError, urllib.error.URLError, RuntimeError, KeyError) as e:
        for p in procs:
            p.terminate()
        log(f"error: cannot subscribe the drill's receivers at {consumer}: {e}")
        sys.exit(2)

    traffic = Traffic(producer, args.rate, args.workers, prefix)
    sampler = Sampler(args, stack, receivers, traffic)
    faults = Faults(args, stack, receivers)
    windows = []
    exit_code = 2
    try:
        traffic.start()
        sampler.start()
        t0 = traffic.t0
        time.sleep(args.warmup)
        for name in plan:
            log(f"fault: {name} — {FAULT_HELP[name]}")
            w = getattr(faults, name)()
            target = traffic.acked_before(w.end)
            deadline = time.time() + args.recovery_timeout
            while not sampler.received_all(w.receiver, target) and time.time() < deadline:
                time.sleep(0.25)
            if sampler.received_all(w.receiver, target):
                w.recovery = time.time() - w.end
                log(f"recovered: '{w.receiver}' has every message acknowledged before the fault ended, {w.recovery:.1f}s after it")
            else:
                log(f"not recovered within {args.recovery_timeout:g}s")
            windows.append(w)
            time.sleep(args.gap)
        remaining = t0 + args.duration - time.time()
        if remaining > 0:
            time.sleep(remaining)
        traffic.finish()
        t_traffic = time.time()
        log(f"traffic stopped after {t_traffic - t0:.0f}s: {len(traffic.attempted)} attempted, {len(traffic.acked)} acknowledged; draining (at most {args.drain_timeout:g}s)")
        acked = list(traffic.acked)
        deadline = time.time() + args.drain_timeout
        while time.time() < deadline and not all(sampler.received_all(n, acked) for n in receivers):
            time.sleep(0.5)
        drained = all(sampler.received_all(n, acked) for n in receivers)
        time.sleep(3)  # late duplicates still count
        sampler.finish()
        t_end = time.time()
        log("drained" if drained else "NOT drained within the bound")

        summary = {
            "run_id": run_id,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
            "stack": {"brokers": args.brokers, "relays": args.relays, "consumers": args.consumers},
            "traffic": {
                "rate_per_s": args.rate,
                "achieved_rate_per_s": round(len(traffic.attempted) / max(t_traffic - t0, 1e-9), 1),
                "duration_s": round(t_traffic - t0, 1),
                "attempted": len(traffic.attempted),
                "acknowledged": len(traffic.acked),
                "answers": {str(k): v for k, v in sorted(traffic.answers.items())},
                "longest_gap_without_201_s": round(longest_gap(traffic.acked.values(), t0, t_traffic)[0], 1),
            },
            "receivers": account(traffic, receivers, t0, t_end),
            "faults": [{"name": w.name, "receiver": w.receiver, "started_s": round(w.start - t0, 1),
                        "ended_s": round(w.end - t0, 1), "duration_s": round(w.end - w.start, 1),
                        "recovery_s": None if w.recovery is None else round(w.recovery, 1), "note": w.note}
                       for w in windows],
            "drained": drained,
            "drain_s": round(t_end - 3 - t_traffic, 1),
            "outbox_dead_rows_max": max((s["outbox_d"] or 0 for s in sampler.samples), default=0),
        }
        summary["lost"] = sum(r["lost"] for r in summary["receivers"].values())
        summary["unexpected"] = sum(r["unexpected"] for r in summary["receivers"].values())
        summary["duplicates"] = sum(r["duplicates"] for r in summary["receivers"].values())
        summary["longest_stall_s"] = summary["receivers"]["healthy"]["longest_stall_s"]
        summary["valid"] = summary["lost"] == 0 and summary["unexpected"] == 0
        with open(os.path.join(args.results, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(args.results, "samples.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(sampler.samples[0].keys()) if sampler.samples else ["t"])
            w.writeheader()
            for s in sampler.samples:
                w.writerow({**s, "t": round(s["t"] - t0, 2)})
        text = table(summary)
        with open(os.path.join(args.results, "summary.txt"), "w") as f:
            f.write(text + "\n")
        title = (f"chaos drill {run_id}: {args.brokers} broker(s), {args.relays} relay(s), {args.consumers} consumer(s), "
                 f"{args.rate:g}/s — lost {summary['lost']}, unexpected {summary['unexpected']}, duplicates {summary['duplicates']}")
        try:
            plot(os.path.join(args.results, "timeline.png"), t0, t_end, traffic, sampler, receivers, windows, title)
        except ImportError as e:
            log(f"no timeline picture: {e}")
        print(text)
        print(f"\nlost {summary['lost']}, unexpected {summary['unexpected']}, duplicates {summary['duplicates']}"
              f" (at least once: allowed); results in {args.results}")
        exit_code = 0 if summary["valid"] else 1
    except (RuntimeError, OSError, urllib.error.URLError) as e:
        log(f"error: the drill stopped: {e} (stack commands and their output: {stack_log.name})")
        exit_code = 2
    finally:
        traffic.stop.set()
        sampler.stop.set()
        for rx in receivers.values():
            try:
                http_json("DELETE", f"{consumer}/endpoints/{rx.endpoint_id}", token=args.admin_token)
            except (OSError, urllib.error.URLError, ValueError):
                pass
        for p in procs:
            p.terminate()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
