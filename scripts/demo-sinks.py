#!/usr/bin/env python3
"""The local stack's notification sinks, so the notifier's channels have somewhere to send to.

  SMTP  127.0.0.1:$SMTP_SINK_PORT (default 2525): accepts every message (plain SMTP, no auth)
  chat  127.0.0.1:$CHAT_SINK_PORT (default 8099): a Telegram-style Bot API,
        POST /bot<token>/sendMessage {"chat_id", "text"} -> {"ok": true, "result": {...}}

Each message received is appended as one JSON line to $SINK_LOG (default ./sinks.jsonl):
{"sink": "smtp"|"chat", "at": ..., ...}. Python's standard library only.
"""
import asyncio
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SMTP_PORT = int(os.environ.get("SMTP_SINK_PORT", "2525"))
CHAT_PORT = int(os.environ.get("CHAT_SINK_PORT", "8099"))
LOG = os.environ.get("SINK_LOG", "sinks.jsonl")
lock = threading.Lock()
counter = 0


def record(entry):
    global counter
    with lock:
        counter += 1
        entry = {"at": time.time(), **entry}
        with open(LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return counter


async def smtp_session(reader, writer):
    """Just enough of RFC 5321 for a client that sends plain mail: EHLO, MAIL, RCPT, DATA, QUIT."""
    def send(line):
        writer.write((line + "\r\n").encode())

    send("220 outbox-smtp-sink ready")
    mail_from, rcpt = None, []
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            verb = line.decode(errors="replace").strip().split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                send("250-outbox-smtp-sink" if verb == "EHLO" else "250 outbox-smtp-sink")
                if verb == "EHLO":
                    send("250-8BITMIME")
                    send("250 SMTPUTF8")
            elif verb == "MAIL":
                mail_from, rcpt = line.decode(errors="replace").strip()[10:], []
                send("250 OK")
            elif verb == "RCPT":
                rcpt.append(line.decode(errors="replace").strip()[8:])
                send("250 OK")
            elif verb == "DATA":
                send("354 end with <CRLF>.<CRLF>")
                await writer.drain()
                body = []
                while True:
                    data = await reader.readline()
                    if not data or data in (b".\r\n", b".\n"):
                        break
                    body.append(data.decode(errors="replace"))
                text = "".join(body)
                subject = next((l[8:].strip() for l in body if l.lower().startswith("subject:")), "")
                record({"sink": "smtp", "from": mail_from, "to": rcpt, "subject": subject, "bytes": len(text)})
                send("250 OK queued")
            elif verb == "RSET":
                mail_from, rcpt = None, []
                send("250 OK")
            elif verb == "NOOP":
                send("250 OK")
            elif verb == "QUIT":
                send("221 bye")
                await writer.drain()
                break
            else:
                send("502 command not implemented")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


class Chat(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            message = json.loads(body)
        except ValueError:
            return self.answer(400, {"ok": False, "description": "Bad Request: body is not JSON"})
        if not self.path.endswith("/sendMessage") or not message.get("chat_id"):
            return self.answer(400, {"ok": False, "description": "Bad Request: chat_id and /sendMessage needed"})
        n = record({"sink": "chat", "chat_id": message.get("chat_id"), "text": str(message.get("text", ""))[:200]})
        self.answer(200, {"ok": True, "result": {"message_id": n, "chat": {"id": message["chat_id"]}}})

    def do_GET(self):
        self.answer(200, {"ok": True, "sink": "chat"})

    def answer(self, status, doc):
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


async def main():
    chat = ThreadingHTTPServer(("127.0.0.1", CHAT_PORT), Chat)
    threading.Thread(target=chat.serve_forever, daemon=True).start()
    server = await asyncio.start_server(smtp_session, "127.0.0.1", SMTP_PORT)
    print(f"smtp sink on 127.0.0.1:{SMTP_PORT}, chat sink on 127.0.0.1:{CHAT_PORT}, log {LOG}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
