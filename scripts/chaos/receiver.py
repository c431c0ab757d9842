#!/usr/bin/env python3
"""A webhook receiver of the chaos drill's own (standard library only).

It verifies each request's Standard Webhooks signature as DESIGN.md specifies it (`webhook-signature`
`v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>`, several space-separated,
key = the base64-decoded part of `whsec_...`, timestamp within 5 minutes), answers 200 and appends
one line per request to its log, tab-separated: unix time, outcome, the drill token (the message's
`data.content`), the webhook id. Outcomes: `accepted`, `failing` (answered 503 because the drill
told it to fail), `bad_signature` (401).

    receiver.py --name healthy --secret whsec_... --log healthy.tsv --port-file healthy.port

`POST /_drill/fail` with `{"seconds": 20}` makes it answer 503 (after reading the request) for that
long; `GET /_drill/state` answers `{"failing_for": <seconds left>}`. It listens on 127.0.0.1 only.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE_S = 300


def signature_valid(key: bytes, headers, body: bytes) -> bool:
    wid = headers.get("webhook-id")
    ts = headers.get("webhook-timestamp")
    sigs = headers.get("webhook-signature")
    if not (wid and ts and sigs):
        return False
    try:
        if abs(time.time() - int(ts)) > TOLERANCE_S:
            return False
    except ValueError:
        return False
    expected = base64.b64encode(
        hmac.new(key, f"{wid}.{ts}.".encode() + body, hashlib.sha256).digest()
    ).decode()
    for sig in sigs.split(" "):
        version, _, value = sig.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


class Receiver:
    def __init__(self, key: bytes, log_path: str):
        self.key = key
        self.lock = threading.Lock()
        self.log = open(log_path, "a", buffering=1)
        self.fail_until = 0.0

    def record(self, outcome: str, token: str, wid: str):
        with self.lock:
            self.log.write(f"{time.time():.3f}\t{outcome}\t{token}\t{wid}\n")


def make_handler(rx: Receiver):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the log file is the record
            pass

        def answer(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/_drill/state":
                self.answer(200, {"failing_for": max(0.0, rx.fail_until - time.time())})
            else:
                self.answer(404, {"error": "not found", "code": "not_found"})

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            if self.path == "/_drill/fail":
                seconds = float(json.loads(body or b"{}").get("seconds", 0))
                rx.fail_until = time.time() + seconds
                self.answer(200, {"failing_for": seconds})
                return
            wid = self.headers.get("webhook-id", "")
            if not signature_valid(rx.key, self.headers, body):
                rx.record("bad_signature", "", wid)
                self.answer(401, {"error": "bad signature", "code": "bad_signature"})
                return
            try:
                token = str(json.loads(body)["data"]["content"])
            except (ValueError, KeyError, TypeError):
                token = ""
            if time.time() < rx.fail_until:
                rx.record("failing", token, wid)
                self.answer(503, {"error": "failing on purpose", "code": "drill"})
                return
            rx.record("accepted", token, wid)
            self.answer(200, {"received": wid})

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--secret", required=True, help="whsec_<base64>")
    ap.add_argument("--log", required=True)
    ap.add_argument("--port", type=int, default=0, help="0: any free port")
    ap.add_argument("--port-file", required=True, help="where the chosen port is written")
    args = ap.parse_args()
    key = base64.b64decode(args.secret.removeprefix("whsec_"))
    rx = Receiver(key, args.log)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(rx))
    server.daemon_threads = True
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(args.port_file + ".tmp", args.port_file)
    print(f"receiver {args.name} on 127.0.0.1:{server.server_address[1]}", file=sys.stderr)
    parent = os.getppid()

    def exit_with_parent():  # never outlive the drill that started it
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
