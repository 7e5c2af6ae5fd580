"""A scriptable, fault-injecting SMTP server for the tests, on Twisted's reactor.

It speaks enough SMTP to take mail normally -- 220 greeting, EHLO with a
configurable extension list (PIPELINING, SIZE, 8BITMIME, ...), HELO, MAIL,
RCPT, DATA with dot-unstuffing, RSET, NOOP, QUIT -- and records what it got:
every raw command line, every connection, every message (envelope and bytes
after unstuffing) with the reply it gave to the final dot.

Every stage can be scripted. A script is a dict (JSON-compatible, so the
same script drives the server in-process and as a subprocess)::

    {
      "hostname": "faulty.test",
      "extensions": ["PIPELINING", "SIZE 10240000", "8BITMIME"],
      "max_recipients": 2,             # 452 4.5.3 after the 2nd RCPT of a transaction
      "stages": {
        "greeting": ACTION,            # on connect
        "ehlo": ACTION, "helo": ACTION,
        "mail": ACTION,
        "rcpt": ACTION,                # every RCPT without its own entry
        "rcpt:bob@dest.test": ACTION,  # one recipient (address compared case-insensitively)
        "data": ACTION,                # the reply to DATA (354 by default)
        "body": ACTION,                # while the message data arrives (drop/reset/hang/stall)
        "dot": ACTION,                 # the reply to the final dot
        "rset": ACTION, "noop": ACTION, "quit": ACTION
      }
    }

An ACTION is a dict; all keys are optional:

    "code" + "text"   the reply; "text" is a str, or a list of str for a
                      multi-line reply ("250-a", "250-b", "250 c").
    "raw"             exact bytes (str, latin-1) to send instead of a reply,
                      no CRLF added: malformed replies, "25\\r\\n", code
                      changes inside a multi-line reply, overlong lines...
    "action"          "reply" (default): send the reply now;
                      "drop": close the connection (FIN) without replying;
                      "reset": abort the connection (RST) without replying;
                      "hang": never answer (keep reading, process nothing more);
                      "stall": never answer and stop reading from the socket;
                      "tarpit": send the reply one byte at a time, "rate" bytes
                      per second (default 1), then go on;
                      "delay": send the reply after "seconds", then go on;
                      "endless": send the line "line" (default "250-x") for
                      ever -- at most "max_lines" lines (default 1,000,000),
                      as a flow-controlled producer, stopping when the peer
                      goes away.
    "then"            after the reply: "drop", "reset", "hang" or "stall".
    "skip"            answer normally the first N times this stage key is
                      reached (counted over the whole server), then act.
    "times"           act N times only (after the skipped ones); the
                      default after.
    "after_bytes"     for "body": act once this many bytes of data arrived.

In-process use (twisted.trial tests, real reactor)::

    server = FaultySMTPServer({"stages": {"rcpt": {"code": 550, "text": "5.1.1 no"}}})
    server.listen(reactor)            # 127.0.0.1, port 0
    self.addCleanup(server.stop)
    ... relay=f"127.0.0.1:{server.port}" ...
    server.messages, server.commands, server.connections

As a program (for tests that start the daemon in a subprocess)::

    python tests/faulty_smtp.py --script JSON --port-file F [--port N]
                                [--record FILE] [--max-lifetime SECONDS]

writes the port to F once listening, and appends one JSON line per event
to FILE: {"event": "connection", ...} and {"event": "message", "mail_from",
"rcpt_tos", "data_b64", "reply"}. SIGTERM stops it.

Listens on loopback only. Every timer it starts is cancelled when its
connection goes, and L{FaultySMTPServer.stop} aborts every connection, so
trial's reactor stays clean.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from typing import Any

from twisted.internet import defer, interfaces, protocol
from zope.interface import implementer

from twisted_mailout.smtp.replies import encode_reply

__all__ = ["DEFAULT_EXTENSIONS", "FaultySMTPServer", "reply_bytes"]

DEFAULT_EXTENSIONS = ("PIPELINING", "SIZE 10240000", "8BITMIME")
MAX_COMMAND_LINE = 65536  # a longer command line ends the connection
_ADDR = re.compile(r"^(?:MAIL\s+FROM|RCPT\s+TO)\s*:\s*<([^>]*)>", re.IGNORECASE)


def reply_bytes(code: int, text: str | list[str]) -> bytes:
    """A well-formed (possibly multi-line) SMTP reply (the package's own
    encoder, L{twisted_mailout.smtp.replies.encode_reply})."""
    return encode_reply(code, "\n".join(text) if isinstance(text, list) else text)


def _code_of(data: bytes) -> int | None:
    if len(data) >= 3 and data[:3].isdigit():
        return int(data[:3])
    return None


@implementer(interfaces.IPushProducer)
class _Endless:
    """Writes the same line for ever (bounded), pausing when the socket is full."""

    BATCH = 512

    def __init__(self, proto: FaultySMTPProtocol, line: bytes, max_lines: int):
        self.proto = proto
        self.line = line
        self.max_lines = max_lines
        self.sent = 0
        self.paused = False
        self.stopped = False
        self._call = None

    def start(self):
        self.proto.transport.registerProducer(self, True)
        self._schedule()

    def _schedule(self):
        if self._call is None and not self.paused and not self.stopped:
            self._call = self.proto.clock.callLater(0, self._pump)

    def _pump(self):
        self._call = None
        if self.paused or self.stopped:
            return
        n = min(self.BATCH, self.max_lines - self.sent)
        self.sent += n
        self.proto.factory.endless_lines_sent += n
        self.proto.transport.write(self.line * n)
        if self.sent >= self.max_lines:
            self.stop()
            self.proto.transport.unregisterProducer()
            return
        self._schedule()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._schedule()

    def stopProducing(self):
        self.stop()

    def stop(self):
        self.stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class FaultySMTPProtocol(protocol.Protocol):
    """One server connection; see the module docstring for the script."""

    factory: FaultySMTPServer

    def connectionMade(self):
        self.clock = self.factory.reactor
        self.index = len(self.factory.connections)
        self.record = {"index": self.index, "commands": [], "closed": False}
        self.factory.connections.append(self.record)
        self.factory._open.add(self)
        self.factory._event({"event": "connection", "index": self.index})
        self.lost = defer.Deferred()
        self._buf = b""
        self._paused = False  # processing of received bytes stopped (hang, tarpit...)
        self._gone = False
        self._timers: list = []
        self._endless: _Endless | None = None
        self._in_data = False
        self._body_action: dict | None = None
        self._body_bytes = 0
        self._data: list[bytes] = []
        self._reset_tx()
        self._stage("greeting", None, 220, f"{self.factory.hostname} ESMTP faulty_smtp")

    def connectionLost(self, reason=protocol.connectionDone):
        self._gone = True
        self.record["closed"] = True
        for t in self._timers:
            if t.active():
                t.cancel()
        self._timers = []
        if self._endless is not None:
            self._endless.stop()
        self.factory._open.discard(self)
        self.lost.callback(None)

    # -- helpers -------------------------------------------------------------

    def _reset_tx(self):
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.tx_rcpt_count = 0

    def _later(self, delay, f, *a):
        self._timers = [t for t in self._timers if t.active()]
        t = self.clock.callLater(delay, f, *a)
        self._timers.append(t)
        return t

    def _close(self, how: str):
        if self._gone:
            return
        if how == "reset":
            self._paused = True
            self.transport.abortConnection()
        elif how == "drop":
            self._paused = True
            self.transport.loseConnection()
        elif how == "hang":
            self._paused = True
        elif how == "stall":
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self):
        if self._gone:
            return
        self._paused = False
        self._process()

    def _stage(self, stage: str, key: str | None, code: int, text) -> int | None:
        """Answer one stage per the script; returns the reply code sent (or
        being sent), L{None} when nothing will be (drop, hang...)."""
        act = self.factory.action_for(stage, key) or {}
        kind = act.get("action", "reply")
        self.factory.stages_seen.append((self.index, key or stage))
        if kind in ("drop", "reset", "hang", "stall"):
            self._close(kind)
            return None
        if kind == "endless":
            self._paused = True
            line = act.get("line", "250-x").encode("latin-1") + b"\r\n"
            self._endless = _Endless(self, line, int(act.get("max_lines", 1_000_000)))
            self._endless.start()
            return None
        if "raw" in act:
            data = act["raw"].encode("latin-1")
            sent_code = _code_of(data)
        else:
            sent_code = int(act.get("code", code))
            data = reply_bytes(sent_code, act.get("text", text))
        then = act.get("then")
        if kind == "tarpit":
            self._paused = True
            interval = 1.0 / float(act.get("rate", 1.0))
            self._trickle(data, interval, then)
        elif kind == "delay":
            self._paused = True
            self._later(float(act.get("seconds", 1.0)), self._send_then, data, then)
        elif kind == "reply":
            self.transport.write(data)
            if then:
                self._close(then)
        else:
            raise ValueError(f"unknown action {kind!r}")
        return sent_code

    def _send_then(self, data: bytes, then: str | None):
        if self._gone:
            return
        self.transport.write(data)
        if then:
            self._close(then)
        else:
            self._resume()

    def _trickle(self, data: bytes, interval: float, then):
        if self._gone:
            return
        if not data:
            if then:
                self._close(then)
            else:
                self._resume()
            return
        self.transport.write(data[:1])
        self._later(interval, self._trickle, data[1:], interval, then)

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes):
        self._buf += data
        self._process()

    def _process(self):
        while not self._paused and not self._gone:
            if self._in_data:
                if self._body_action is not None:
                    after = int(self._body_action.get("after_bytes", 0))
                    if self._body_bytes + len(self._buf) > after or (after == 0 and self._buf):
                        act, self._body_action = self._body_action, None
                        self.factory.stages_seen.append((self.index, "body"))
                        self._close(act.get("action", "drop"))
                        return
            i = self._buf.find(b"\n")
            if i < 0:
                if not self._in_data and len(self._buf) > MAX_COMMAND_LINE:
                    self.transport.write(b"500 5.5.2 line too long\r\n")
                    self._close("drop")
                return
            raw, self._buf = self._buf[: i + 1], self._buf[i + 1 :]
            line = raw[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._in_data:
                self._body_bytes += len(raw)
                self._data_line(line)
            else:
                self.record["commands"].append(line)
                self.factory.commands.append(line)
                self._command(line)

    def _data_line(self, line: bytes):
        if line == b".":
            self._in_data = False
            self._end_of_data()
            return
        if line.startswith(b"."):
            line = line[1:]
        self._data.append(line + b"\r\n")

    def _end_of_data(self):
        msg = {"connection": self.index, "mail_from": self.mail_from,
               "rcpt_tos": list(self.rcpts), "data": b"".join(self._data), "reply": None}
        self._data = []
        self.factory.messages.append(msg)
        self.factory.dots += 1
        code = self._stage("dot", None, 250, f"2.0.0 Ok: queued as Q{self.factory.dots}")
        msg["reply"] = code
        self.factory._event({"event": "message", "connection": self.index,
                             "mail_from": msg["mail_from"], "rcpt_tos": msg["rcpt_tos"],
                             "data_b64": base64.b64encode(msg["data"]).decode("ascii"),
                             "reply": code})
        self._reset_tx()

    def _command(self, line: bytes):
        text = line.decode("utf-8", "replace")
        verb = text.split(" ", 1)[0].upper()
        f = self.factory
        if verb == "EHLO":
            self._reset_tx()
            self._stage("ehlo", None, 250, [f.hostname, *f.extensions])
        elif verb == "HELO":
            self._reset_tx()
            self._stage("helo", None, 250, f.hostname)
        elif verb == "MAIL":
            m = _ADDR.match(text)
            if self.mail_from is not None:
                self.transport.write(b"503 5.5.1 Error: nested MAIL command\r\n")
            elif m is None:
                self.transport.write(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
            else:
                code = self._stage("mail", None, 250, "2.1.0 Ok")
                if code is not None and 200 <= code < 300:
                    self.mail_from = m.group(1)
        elif verb == "RCPT":
            m = _ADDR.match(text)
            if self.mail_from is None:
                self.transport.write(b"503 5.5.1 Error: need MAIL command\r\n")
            elif m is None:
                self.transport.write(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n")
            elif f.max_recipients is not None and self.tx_rcpt_count >= f.max_recipients:
                self.transport.write(b"452 4.5.3 Error: too many recipients\r\n")
            else:
                addr = m.group(1)
                code = self._stage("rcpt", f"rcpt:{addr.lower()}", 250, "2.1.5 Ok")
                if code is not None and 200 <= code < 300:
                    self.rcpts.append(addr)
                    self.tx_rcpt_count += 1
        elif verb == "DATA":
            if self.mail_from is None:
                self.transport.write(b"503 5.5.1 Error: need MAIL command\r\n")
            elif not self.rcpts:
                self.transport.write(b"554 5.5.1 Error: no valid recipients\r\n")
            else:
                code = self._stage("data", None, 354, "End data with <CR><LF>.<CR><LF>")
                if code == 354:
                    self._in_data = True
                    self._body_bytes = 0
                    self._body_action = f.action_for("body", None)
        elif verb == "RSET":
            self._reset_tx()
            self._stage("rset", None, 250, "2.0.0 Ok")
        elif verb == "NOOP":
            self._stage("noop", None, 250, "2.0.0 Ok")
        elif verb == "QUIT":
            code = self._stage("quit", None, 221, "2.0.0 Bye")
            if code is not None:
                self._close("drop")
        elif verb == "STARTTLS":
            self.transport.write(b"454 4.7.0 TLS not available\r\n")
        elif verb == "VRFY":
            self.transport.write(b"252 2.0.0 Cannot VRFY user\r\n")
        else:
            self.transport.write(b"500 5.5.2 Error: command not recognized\r\n")


class FaultySMTPServer(protocol.Factory):
    """The listening side, its script and everything it recorded.

    @ivar connections: one dict per connection: C{index}, C{commands}
        (raw lines, bytes), C{closed}.
    @ivar commands: every command line received, all connections, in order.
    @ivar messages: one dict per final dot received: C{connection},
        C{mail_from}, C{rcpt_tos} (the accepted recipients), C{data} (bytes
        after unstuffing, CRLF line ends) and C{reply} (the code sent to the
        dot, L{None} when the connection was dropped or left hanging).
    @ivar stages_seen: C{(connection index, stage key)} as they were reached.
    @ivar endless_lines_sent: lines written by C{endless} actions.
    """

    protocol = FaultySMTPProtocol
    noisy = False

    def __init__(self, script: dict | None = None, reactor=None, on_event=None):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.on_event = on_event
        self.port_listener = None
        self.connections: list[dict] = []
        self.commands: list[bytes] = []
        self.messages: list[dict] = []
        self.stages_seen: list[tuple[int, str]] = []
        self.endless_lines_sent = 0
        self.dots = 0
        self._open: set[FaultySMTPProtocol] = set()
        self._used: dict[str, int] = {}
        self.set_script(script or {})

    def set_script(self, script: dict) -> None:
        """Replace the script (for new commands and connections)."""
        self.script = script
        self.hostname = script.get("hostname", "faulty.test")
        self.extensions = list(script.get("extensions", DEFAULT_EXTENSIONS))
        self.max_recipients = script.get("max_recipients")
        self.stages = {k.lower(): v for k, v in script.get("stages", {}).items()}
        self._used = {}

    def action_for(self, stage: str, key: str | None) -> dict | None:
        for k in (key, stage):
            if k is None or k not in self.stages:
                continue
            act = self.stages[k]
            n = self._used.get(k, 0)
            self._used[k] = n + 1
            skip = int(act.get("skip", 0))
            times = act.get("times")
            if n < skip or (times is not None and n >= skip + times):
                continue
            return act
        return None

    def _event(self, ev: dict) -> None:
        if self.on_event is not None:
            self.on_event(ev)

    # -- what was seen -------------------------------------------------------

    @property
    def delivered(self) -> list[dict]:
        """The messages whose final dot got a 2xx reply."""
        return [m for m in self.messages if m["reply"] is not None and 200 <= m["reply"] < 300]

    def verbs(self, connection: int | None = None) -> list[str]:
        """The command verbs received (upper case), of one connection or all."""
        lines = self.commands if connection is None else self.connections[connection]["commands"]
        return [ln.split(b" ", 1)[0].decode("ascii", "replace").upper() for ln in lines]

    # -- listening -----------------------------------------------------------

    def listen(self, reactor=None, port: int = 0, interface: str = "127.0.0.1"):
        """Listen on loopback; returns C{self} (see L{port})."""
        r = reactor or self.reactor
        self.port_listener = r.listenTCP(port, self, interface=interface)
        return self

    @property
    def port(self) -> int:
        return self.port_listener.getHost().port

    def stop(self, timeout: float = 5.0) -> defer.Deferred:
        """Stop listening and abort every open connection; fires when all are
        gone (or after C{timeout} seconds)."""
        ds = []
        if self.port_listener is not None:
            ds.append(defer.maybeDeferred(self.port_listener.stopListening))
            self.port_listener = None
        for p in list(self._open):
            ds.append(p.lost)
            p.transport.abortConnection()
        d = defer.DeferredList(ds)
        timer = self.reactor.callLater(timeout, d.cancel)
        d.addBoth(lambda _: timer.cancel() if timer.active() else None)
        return d


# --------------------------------------------------------------------------- program


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal

    from twisted.internet import reactor

    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--script", default="{}", help="the script, JSON (or @FILE)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--interface", default="127.0.0.1")
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--record", help="append one JSON line per event to this file")
    ap.add_argument("--max-lifetime", type=float, default=600.0,
                    help="stop by itself after this many seconds (safety net)")
    a = ap.parse_args(argv)
    if a.interface not in ("127.0.0.1", "::1"):
        ap.error("loopback addresses only")
    text = a.script
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    script: dict[str, Any] = json.loads(text)
    record = open(a.record, "a") if a.record else None  # noqa: SIM115

    def on_event(ev):
        if record is not None:
            record.write(json.dumps(ev) + "\n")
            record.flush()

    server = FaultySMTPServer(script, reactor=reactor, on_event=on_event)
    server.listen(reactor, a.port, a.interface)
    tmp = a.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{server.port}\n")
    os.replace(tmp, a.port_file)
    reactor.callLater(a.max_lifetime, reactor.stop)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.run(installSignalHandlers=False)
    if record is not None:
        record.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
