"""Lose nothing, double nothing: the right outcome for every hostile or broken
server behaviour.

twisted_mailout.sendmail() against the fault-injecting server of
``tests/faulty_smtp.py`` (in-process, real reactor, loopback only), with short
timeouts so every case resolves within seconds; and one daemon-level test
where the server drops the connection after the final dot and a restarted,
normal server then gets the retry.

Cases that share a shape run concurrently (one server each) inside one test,
and every mismatch is reported at once, labelled with its case.

What a user relies on:
- delivered only when the server said 2xx to the final dot;
- bounced only when the server gave that recipient a 5xx;
- everything else -- refusals of the session, 4xx, drops, silence, tarpits,
  garbage -- deferred, within a bounded time, never a hang.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from tests.support.daemon import Daemon, env, queue_list
from tests.support.trial import deferred_test
from tests.support.wait import wait_for
from tests.support.faulty_smtp import DEFAULT_EXTENSIONS, FaultySMTPServer
from twisted.internet import defer, reactor
from twisted.trial import unittest

import twisted_mailout

HERE = Path(__file__).resolve().parent

SENDER = "sender@origin.test"
RCPTS = ["a@dest.test", "b@dest.test", "c@dest.test"]
MSG = (b"Message-ID: <hostile@test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
       b"Subject: hostile\r\n\r\n.leading dot\r\n..two dots\r\nbody\r\n")
BIG = (b"Message-ID: <big@test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
       b"Subject: big\r\n\r\n" + (b"." + b"x" * 77 + b"\r\n") * 50_000)  # ~4 MB
TIMEOUT = 2
BOUND = 5 * TIMEOUT  # no case may take longer than this

NO_PIPELINING = [e for e in DEFAULT_EXTENSIONS if e != "PIPELINING"]
MODES = {"pipelined": list(DEFAULT_EXTENSIONS), "serial": NO_PIPELINING}


def script(extensions, **stages):
    return {"extensions": extensions, "stages": stages}


def reply(code, text, **kw):
    return {"code": code, "text": text, **kw}


def summary(report):
    return [(r.recipient, r.status, r.code, r.local) for r in report]


def reached(server, key):
    """Whether the scripted stage C{key} was reached (the case tested what it says)."""
    return any(k == key or k.startswith(key + ":") for _, k in server.stages_seen)


def phantoms(report, server, message=MSG):
    """Recipients reported delivered for whom the server never accepted this
    message (a 2xx reply to a completed DATA carrying these bytes): lost mail."""
    got = {rc.lower() for m in server.delivered if m["data"] == message
           for rc in m["rcpt_tos"]}
    return [r.recipient for r in report if r.status == "delivered"
            and r.recipient.lower() not in got]


class Hostile(unittest.TestCase):
    timeout = 60

    def server(self, script=None):
        s = FaultySMTPServer(script).listen(reactor)
        self.addCleanup(s.stop)
        return s

    async def send(self, server, recipients=None, message=MSG, timeout=TIMEOUT):
        """sendmail() to C{server}; returns C{(report, elapsed seconds)}; fails
        the test if the Deferred has not fired after C{5 * timeout + 5} s."""
        start = reactor.seconds()
        d = twisted_mailout.sendmail(SENDER, recipients or RCPTS, message,
                                     relay=f"127.0.0.1:{server.port}", timeout=timeout,
                                     tls="none", helo="client.test")
        d.addTimeout(5 * timeout + 5, reactor)
        report = await d
        return report, reactor.seconds() - start

    async def run_cases(self, cases, recipients=None, message=MSG, timeout=TIMEOUT):
        """Each C{label: script} against its own server, all at once.

        @return: C{{label: (server, report, elapsed)}}.
        """
        servers = {label: self.server(s) for label, s in cases.items()}
        for srv in servers.values():
            srv.sent_message = message  # for the no-phantom-delivery check
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.send(servers[k], recipients, message, timeout))
             for k in cases], consumeErrors=True)
        return {k: (servers[k], *res) for k, res in zip(cases, results, strict=True)}

    def check_all(self, results, expect, bound=BOUND):
        """C{expect(label, server, report, elapsed)} returns a list of problems
        (strings); all problems of all cases fail the test together."""
        problems = []
        for label, (server, report, elapsed) in results.items():
            if elapsed >= bound:
                problems.append(f"{label}: took {elapsed:.1f}s (bound {bound}s)")
            for p in expect(label, server, report, elapsed):
                problems.append(f"{label}: {p}")
            lost = phantoms(report, server, server.sent_message)
            if lost:
                problems.append(f"{label}: reported delivered, never sent: {lost} "
                                f"{summary(report)}")
        self.assertEqual(problems, [], "\n" + "\n".join(problems))

    # -------------------------------------------------------------- normal runs

    @deferred_test
    async def test_normal_delivery_through_the_faulty_server(self):
        """The server itself is sound: both modes deliver, bytes unstuffed back."""
        results = await self.run_cases({m: script(ext) for m, ext in MODES.items()})

        def expect(label, server, report, elapsed):
            p = []
            if not report.all_delivered:
                p.append(f"not delivered: {summary(report)}")
            if [m["data"] for m in server.delivered] != [MSG]:
                p.append(f"messages {server.messages!r}")
            if server.messages and server.messages[0]["rcpt_tos"] != RCPTS:
                p.append(f"rcpt_tos {server.messages[0]['rcpt_tos']}")
            want = ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"]
            if server.verbs() != want:
                p.append(f"verbs {server.verbs()}")
            if report["a@dest.test"].relay != f"127.0.0.1[127.0.0.1]:{server.port}":
                p.append(f"relay {report['a@dest.test'].relay}")
            return p

        self.check_all(results, expect)

    # -------------------------------------------------------------- refusals at each stage

    @deferred_test
    async def test_421_at_connect_defers_with_the_servers_code_and_text(self):
        srv = self.server({"stages": {"greeting": reply(421, "4.3.2 busy, come back later",
                                                        then="drop")}})
        report, elapsed = await self.send(srv)
        for r in report:
            self.assertEqual((r.status, r.code), ("deferred", 421), r)
            self.assertIn("4.3.2 busy, come back later", r.text)
        self.assertNotIn("MAIL", srv.verbs())
        self.assertLess(elapsed, BOUND)

    @deferred_test
    async def test_554_greeting_defers_it_is_not_a_per_recipient_refusal(self):
        # RFC 5321 3.1: a 554 greeting refuses the session; the next host
        # would be tried, so no recipient may bounce.
        srv = self.server({"stages": {"greeting": reply(554, "5.7.1 no mail from you")}})
        report, elapsed = await self.send(srv)
        for r in report:
            self.assertEqual(r.status, "deferred", r)
            self.assertTrue(400 <= r.code < 500, r)
            self.assertIn("no mail from you", r.text)
        self.assertNotIn("MAIL", srv.verbs())
        self.assertLess(elapsed, BOUND)

    @deferred_test
    async def test_4xx_at_ehlo_defers_without_helo(self):
        cases = {
            "451": script(DEFAULT_EXTENSIONS, ehlo=reply(451, "4.3.0 not now")),
            "421+close": script(DEFAULT_EXTENSIONS, ehlo=reply(421, "4.7.0 slow down",
                                                               then="drop")),
        }
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            p = []
            code = int(label[:3])
            if [(r.status, r.code) for r in report] != [("deferred", code)] * 3:
                p.append(summary(report))
            if "HELO" in server.verbs() or "MAIL" in server.verbs():
                p.append(f"verbs {server.verbs()}")
            return p

        self.check_all(results, expect)

    @deferred_test
    async def test_5xx_at_ehlo_falls_back_to_helo_and_delivers(self):
        # RFC 5321 3.2 lists 500, 502 and 550 (and 501) as "EHLO not acceptable".
        cases = {str(c): script(DEFAULT_EXTENSIONS, ehlo=reply(c, "5.5.1 what is EHLO"))
                 for c in (500, 502, 550)}
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            p = []
            if not report.all_delivered:
                p.append(summary(report))
            verbs = server.verbs()
            if verbs[:3] != ["EHLO", "HELO", "MAIL"]:
                p.append(f"verbs {verbs}")
            if verbs.count("MAIL") != 1 or "RCPT" not in verbs:
                p.append(f"verbs {verbs}")  # no PIPELINING after HELO: serial
            if [m["data"] for m in server.delivered] != [MSG]:
                p.append("message not delivered intact")
            return p

        self.check_all(results, expect)

    @deferred_test
    async def test_501_at_ehlo_falls_back_to_helo_and_delivers(self):
        srv = self.server(script(DEFAULT_EXTENSIONS, ehlo=reply(501, "5.5.4 syntax error")))
        report, _ = await self.send(srv)
        self.assertTrue(report.all_delivered, summary(report))
        self.assertEqual(srv.verbs()[:2], ["EHLO", "HELO"])

    @deferred_test
    async def test_ehlo_and_helo_both_refused_defers(self):
        cases = {
            "helo 550": script(DEFAULT_EXTENSIONS, ehlo=reply(502, "5.5.1 no EHLO"),
                               helo=reply(550, "5.7.1 go away")),
            "helo 451": script(DEFAULT_EXTENSIONS, ehlo=reply(500, "5.5.1 no EHLO"),
                               helo=reply(451, "4.3.0 later")),
        }
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            p = []
            for r in report:
                if r.status != "deferred" or not 400 <= r.code < 500:
                    p.append(summary(report))
                    break
            if server.verbs()[:2] != ["EHLO", "HELO"] or "MAIL" in server.verbs():
                p.append(f"verbs {server.verbs()}")
            return p

        self.check_all(results, expect)

    @deferred_test
    async def test_mail_refused_4xx_defers_all_5xx_bounces_all(self):
        cases = {}
        for mode, ext in MODES.items():
            cases[f"451 {mode}"] = script(ext, mail=reply(451, "4.3.0 sender check failed"))
            cases[f"553 {mode}"] = script(ext, mail=reply(553, "5.7.1 sender rejected"))
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            code = int(label[:3])
            status = "deferred" if code < 500 else "bounced"
            p = []
            if [(r.status, r.code, r.local) for r in report] != [(status, code, False)] * 3:
                p.append(summary(report))
            text = "4.3.0 sender check failed" if code < 500 else "5.7.1 sender rejected"
            if any(r.text != text for r in report):
                p.append([r.text for r in report])
            if server.messages:
                p.append(f"a message got through: {server.messages}")
            if "pipelined" in label and "RCPT" not in server.verbs():
                p.append(f"not pipelined? {server.verbs()}")
            if "serial" in label and "RCPT" in server.verbs():
                p.append(f"RCPT after a refused MAIL: {server.verbs()}")
            return p

        self.check_all(results, expect)

    @deferred_test
    async def test_rcpt_refusals_are_per_recipient_one_data(self):
        cases = {}
        for mode, ext in MODES.items():
            cases[mode] = script(ext, **{"rcpt:b@dest.test": reply(451, "4.2.0 mailbox busy"),
                                         "rcpt:c@dest.test": reply(550, "5.1.1 no such user")})
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            p = []
            want = [("a@dest.test", "delivered", 250, False), ("b@dest.test", "deferred", 451,
                                                                False),
                    ("c@dest.test", "bounced", 550, False)]
            if summary(report) != want:
                p.append(summary(report))
            if report["c@dest.test"].text != "5.1.1 no such user":
                p.append(report["c@dest.test"].text)
            if server.verbs().count("DATA") != 1:
                p.append(f"verbs {server.verbs()}")
            if [(m["rcpt_tos"], m["data"]) for m in server.delivered] != [(["a@dest.test"],
                                                                           MSG)]:
                p.append(f"messages {server.messages}")
            return p

        self.check_all(results, expect)

    @deferred_test
    async def test_mixed_accept_and_refuse_in_one_transaction(self):
        rcpts = [f"r{i}@dest.test" for i in range(6)]
        stages = {
            "rcpt:r1@dest.test": reply(550, "5.1.1 unknown"),
            "rcpt:r2@dest.test": reply(451, "4.7.1 greylisted"),
            "rcpt:r3@dest.test": reply(251, "2.1.5 will forward"),
            "rcpt:r4@dest.test": reply(553, ["5.1.3 bad", "5.1.3 really bad"]),
            "rcpt:r5@dest.test": reply(450, "4.2.1 mailbox unavailable"),
        }
        cases = {mode: {"extensions": ext, "stages": stages} for mode, ext in MODES.items()}
        results = await self.run_cases(cases, recipients=rcpts)

        def expect(label, server, report, elapsed):
            p = []
            got = [(r.status, r.code) for r in report]
            want = [("delivered", 250), ("bounced", 550), ("deferred", 451),
                    ("delivered", 250), ("bounced", 553), ("deferred", 450)]
            if got != want:
                p.append(got)
            if report["r4@dest.test"].text != "5.1.3 bad\n5.1.3 really bad":
                p.append(repr(report["r4@dest.test"].text))
            if server.verbs().count("DATA") != 1 or server.verbs().count("MAIL") != 1:
                p.append(f"verbs {server.verbs()}")
            if [m["rcpt_tos"] for m in server.delivered] != [["r0@dest.test", "r3@dest.test"]]:
                p.append(f"messages {server.messages}")
            return p

        self.check_all(results, expect)

    @deferred_test
    async def test_data_and_final_dot_refusals(self):
        cases = {}
        for mode, ext in MODES.items():
            for stage in ("data", "dot"):
                for code, text in ((451, "4.3.0 try again"), (554, "5.6.0 content rejected")):
                    cases[f"{stage} {code} {mode}"] = script(
                        ext, **{stage: reply(code, text),
                                "rcpt:c@dest.test": reply(550, "5.1.1 no such user")})
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            stage, code, _ = label.split()
            code = int(code)
            status = "deferred" if code < 500 else "bounced"
            p = []
            want = [("a@dest.test", status, code, False), ("b@dest.test", status, code, False),
                    ("c@dest.test", "bounced", 550, False)]
            if summary(report) != want:
                p.append(summary(report))
            if server.delivered:
                p.append("the server says it delivered")
            if stage == "dot" and len(server.messages) != 1:
                p.append("DATA was not sent")
            return p

        self.check_all(results, expect)

    # -------------------------------------------------------------- drops

    DROPS = {
        # label: (stage key, action) -- "drop" closes without replying
        "no greeting": ("greeting", {"action": "drop"}),
        "reset at connect": ("greeting", {"action": "reset"}),
        "after greeting": ("ehlo", {"action": "drop"}),
        "after EHLO": ("mail", {"action": "drop"}),
        "after MAIL": ("rcpt", {"action": "drop"}),
        "after 2nd RCPT": ("rcpt:b@dest.test", {"action": "drop"}),
        "after RCPT": ("data", {"action": "drop"}),
        "after 354": ("body", {"action": "drop"}),
        "during body": ("body", {"action": "drop", "after_bytes": 100_000}),
        "reset during body": ("body", {"action": "reset", "after_bytes": 100_000}),
        "after final dot": ("dot", {"action": "drop"}),
        "reset after final dot": ("dot", {"action": "reset"}),
    }

    @deferred_test
    async def test_dropped_connection_at_each_stage_defers_everyone(self):
        cases = {f"{label} {mode}": script(ext, **{stage: act})
                 for label, (stage, act) in self.DROPS.items() for mode, ext in MODES.items()}
        results = await self.run_cases(cases, message=BIG)

        def expect(label, server, report, elapsed):
            p = []
            if [(r.status, r.code, r.local) for r in report] != [("deferred", 421, True)] * 3:
                p.append(summary(report))
            if server.delivered:
                p.append("the server says it delivered")
            if "final dot" in label and len(server.messages) != 1:
                p.append("the message was not completely sent before the drop")
            stage = self.DROPS[label.rsplit(" ", 1)[0]][0]
            if not reached(server, stage):
                p.append(f"stage {stage} never reached: {server.stages_seen}")
            return p

        self.check_all(results, expect)

    @deferred_test
    async def test_421_then_close_at_each_command_defers_with_the_servers_reply(self):
        cases = {}
        for mode, ext in MODES.items():
            for stage in ("mail", "rcpt", "data", "dot"):
                cases[f"{stage} {mode}"] = script(
                    ext, **{stage: reply(421, "4.3.2 shutting down", then="drop")})
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            p = []
            for r in report:
                if r.status != "deferred" or r.code != 421:
                    p.append(summary(report))
                    break
            if server.delivered:
                p.append("the server says it delivered")
            return p

        self.check_all(results, expect)

    @deferred_test
    async def test_recipient_refused_before_a_drop_in_data_stays_bounced(self):
        # The 550 came before the connection was lost while the body was
        # sent or before the reply to the final dot: that refusal is final.
        cases = {}
        for mode, ext in MODES.items():
            cases[f"body {mode}"] = script(ext, **{
                "rcpt:b@dest.test": reply(550, "5.1.1 no such user"),
                "body": {"action": "drop", "after_bytes": 100_000}})
            cases[f"dot {mode}"] = script(ext, **{
                "rcpt:b@dest.test": reply(550, "5.1.1 no such user"),
                "dot": {"action": "drop"}})
        results = await self.run_cases(cases, message=BIG)

        def expect(label, server, report, elapsed):
            want = [("a@dest.test", "deferred", 421, True), ("b@dest.test", "bounced", 550, False),
                    ("c@dest.test", "deferred", 421, True)]
            return [] if summary(report) == want else [summary(report)]

        self.check_all(results, expect)

    @deferred_test
    async def test_recipient_refused_before_a_drop_at_rcpt_or_data_stays_bounced(self):
        cases = {}
        for mode, ext in MODES.items():
            cases[f"next RCPT {mode}"] = script(ext, **{
                "rcpt:b@dest.test": reply(550, "5.1.1 no such user"),
                "rcpt:c@dest.test": {"action": "drop"}})
            cases[f"DATA {mode}"] = script(ext, **{
                "rcpt:b@dest.test": reply(550, "5.1.1 no such user"),
                "data": {"action": "drop"}})
            cases[f"DATA hangs {mode}"] = script(ext, **{
                "rcpt:b@dest.test": reply(550, "5.1.1 no such user"),
                "data": {"action": "hang"}})
            cases[f"DATA garbage {mode}"] = script(ext, **{
                "rcpt:b@dest.test": reply(550, "5.1.1 no such user"),
                "data": {"raw": "garbage\r\n"}})
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            p = []
            b = report["b@dest.test"]
            if (b.status, b.code, b.local) != ("bounced", 550, False):
                p.append(f"b@dest.test was refused with 550 but is {b.status} {b.code} "
                         f"{b.text!r}")
            for r in (report["a@dest.test"], report["c@dest.test"]):
                if r.status != "deferred":
                    p.append(summary(report))
            return p

        self.check_all(results, expect)

    # -------------------------------------------------------------- silence

    @deferred_test
    async def test_never_answering_at_each_stage_defers_within_the_timeout(self):
        stages = ["greeting", "ehlo", "mail", "rcpt", "rcpt:c@dest.test", "data", "dot"]
        cases = {}
        for mode, ext in MODES.items():
            for stage in stages:
                cases[f"{stage} {mode}"] = script(ext, **{stage: {"action": "hang"}})
            cases[f"body stall {mode}"] = script(ext, body={"action": "stall",
                                                            "after_bytes": 10_000})
        results = await self.run_cases(cases, message=BIG)

        def expect(label, server, report, elapsed):
            p = []
            if [(r.status, r.code, r.local) for r in report] != [("deferred", 421, True)] * 3:
                p.append(summary(report))
            if not all("timeout" in r.text for r in report):
                p.append([r.text for r in report])
            if elapsed < TIMEOUT * 0.9:
                p.append(f"gave up after {elapsed:.2f}s, before the {TIMEOUT}s timeout")
            if server.delivered:
                p.append("the server says it delivered")
            stage = "body" if label.startswith("body") else label.split()[0]
            if not reached(server, stage):
                p.append(f"stage {stage} never reached: {server.stages_seen}")
            return p

        self.check_all(results, expect)

    @deferred_test
    async def test_tarpit_greeting_slower_than_the_timeout_defers(self):
        srv = self.server({"stages": {"greeting": {"action": "tarpit", "rate": 1}}})
        report, elapsed = await self.send(srv, timeout=2)
        for r in report:
            self.assertEqual((r.status, r.code, r.local), ("deferred", 421, True), r)
            self.assertIn("timeout", r.text)
        self.assertLess(elapsed, BOUND)
        self.assertEqual(srv.verbs(), [])

    @deferred_test
    async def test_tarpit_slower_than_the_timeout_at_each_stage_defers(self):
        # Bytes trickling in do not restart a reply's timeout.
        cases = {}
        for mode, ext in MODES.items():
            for stage in ("ehlo", "mail", "rcpt", "data", "dot"):
                cases[f"{stage} {mode}"] = script(ext, **{stage: {"action": "tarpit",
                                                                  "rate": 2}})
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            p = []
            if [(r.status, r.code, r.local) for r in report] != [("deferred", 421, True)] * 3:
                p.append(summary(report))
            if not all("timeout" in r.text for r in report):
                p.append([r.text for r in report])
            if not reached(server, label.split()[0]):
                p.append(f"stage never reached: {server.stages_seen}")
            return p

        self.check_all(results, expect)

    @deferred_test
    async def test_tarpit_that_finishes_within_the_timeout_delivers(self):
        cases = {
            "greeting": {"stages": {"greeting": {"action": "tarpit", "rate": 10, "code": 220,
                                                 "text": "ok"}}},
            "rcpt": {"stages": {"rcpt:b@dest.test": {"action": "tarpit", "rate": 20,
                                                     "code": 250, "text": "ok"}}},
            "dot": {"extensions": NO_PIPELINING,
                    "stages": {"dot": {"action": "tarpit", "rate": 20, "code": 250,
                                       "text": "2.0.0 ok"}}},
        }
        results = await self.run_cases(cases, timeout=3)

        def expect(label, server, report, elapsed):
            p = []
            if not report.all_delivered:
                p.append(summary(report))
            if [m["data"] for m in server.delivered] != [MSG]:
                p.append("not delivered intact")
            return p

        self.check_all(results, expect, bound=5 * 3)

    # -------------------------------------------------------------- garbage

    GARBAGE = {
        "no code": {"raw": "hello, I am not SMTP\r\n"},
        "25 only": {"raw": "25\r\n"},
        "code changes": {"raw": "250-first line\r\n251-second line\r\n251 third\r\n"},
        "bad separator": {"raw": "250_ok\r\n"},
        "overlong line": {"raw": "250 " + "x" * 100_000},
        "endless": {"action": "endless", "line": "250-x"},
    }

    @deferred_test
    async def test_garbage_replies_defer_with_a_local_protocol_error(self):
        stages = ["greeting", "ehlo", "mail", "rcpt", "data", "dot"]
        cases = {}
        for name, act in self.GARBAGE.items():
            for stage in stages:
                for mode, ext in MODES.items():
                    if stage in ("greeting", "ehlo") and mode == "serial":
                        continue  # the same code path either way
                    a = dict(act)
                    if name == "endless" and stage == "greeting":
                        a["line"] = "220-x"
                    cases[f"{name} @{stage} {mode}"] = script(ext, **{stage: a})
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            p = []
            if [(r.status, r.code, r.local) for r in report] != [("deferred", 421, True)] * 3:
                p.append(summary(report))
            if not all("protocol error" in r.text for r in report):
                p.append([r.text for r in report])
            if "endless" in label and server.endless_lines_sent >= 500_000:
                p.append(f"the client read {server.endless_lines_sent} lines")
            stage = label.split("@")[1].split()[0]
            if not reached(server, stage):
                p.append(f"stage {stage} never reached: {server.stages_seen}")
            return p

        self.check_all(results, expect)

    # -------------------------------------------------------------- multi-line

    @deferred_test
    async def test_multiline_replies_at_every_stage(self):
        three = ["first line", "second line", "third line"]
        cases = {}
        for mode, ext in MODES.items():
            cases[mode] = script(
                ext,
                greeting=reply(220, ["faulty.test ESMTP", "no UCE", "really"]),
                mail=reply(250, ["2.1.0 sender", "2.1.0 ok", "2.1.0 fine"]),
                rcpt=reply(250, ["2.1.5 " + t for t in three]),
                data=reply(354, ["go ahead", "end with <CRLF>.<CRLF>"]),
                dot=reply(250, ["2.0.0 " + t for t in three]),
                **{"rcpt:c@dest.test": reply(550, ["5.1.1 " + t for t in three])},
            )
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            p = []
            want = [("a@dest.test", "delivered", 250, False),
                    ("b@dest.test", "delivered", 250, False),
                    ("c@dest.test", "bounced", 550, False)]
            if summary(report) != want:
                p.append(summary(report))
            if report["a@dest.test"].text != "\n".join("2.0.0 " + t for t in three):
                p.append(repr(report["a@dest.test"].text))
            if report["c@dest.test"].text != "\n".join("5.1.1 " + t for t in three):
                p.append(repr(report["c@dest.test"].text))
            if [m["data"] for m in server.delivered] != [MSG]:
                p.append("not delivered intact")
            return p

        self.check_all(results, expect)

    # -------------------------------------------------------------- 452 too many recipients

    async def _too_many_recipients(self, extensions):
        # RFC 5321 4.5.3.1.10: after a 452 the client sends the message to
        # the recipients accepted, then the rest in further transactions.
        srv = self.server({"extensions": extensions, "max_recipients": 2})
        rcpts = [f"r{i}@dest.test" for i in range(5)]
        report, elapsed = await self.send(srv, recipients=rcpts)
        self.assertEqual([(r.status, r.code) for r in report], [("delivered", 250)] * 5,
                         summary(report))
        self.assertEqual(len(srv.connections), 1, "one connection")
        self.assertEqual(srv.verbs().count("MAIL"), 3, srv.verbs())
        self.assertEqual([m["rcpt_tos"] for m in srv.delivered],
                         [rcpts[0:2], rcpts[2:4], rcpts[4:5]])
        self.assertEqual([m["data"] for m in srv.delivered], [MSG] * 3)
        self.assertLess(elapsed, BOUND)

    @deferred_test
    async def test_452_too_many_recipients_continues_in_new_transactions_serial(self):
        await self._too_many_recipients(NO_PIPELINING)

    @deferred_test
    async def test_452_too_many_recipients_continues_in_new_transactions_pipelined(self):
        await self._too_many_recipients(list(DEFAULT_EXTENSIONS))


    @deferred_test
    async def test_452_then_a_drop_after_the_second_final_dot(self):
        # The first transaction is final (delivered); the second's outcome is
        # unknown (deferred); the third was never tried (deferred 452).
        srv = self.server({"extensions": NO_PIPELINING, "max_recipients": 2,
                           "stages": {"dot": {"action": "drop", "skip": 1}}})
        rcpts = [f"r{i}@dest.test" for i in range(5)]
        report, elapsed = await self.send(srv, recipients=rcpts)
        self.assertEqual([(r.status, r.code) for r in report],
                         [("delivered", 250)] * 2 + [("deferred", 421)] * 2
                         + [("deferred", 452)], summary(report))
        self.assertEqual([m["rcpt_tos"] for m in srv.messages], [rcpts[0:2], rcpts[2:4]])
        self.assertEqual(phantoms(report, srv), [])
        self.assertLess(elapsed, BOUND)

    # -------------------------------------------------------------- after the delivery

    @deferred_test
    async def test_misbehaviour_after_the_final_250_keeps_the_delivery(self):
        cases = {}
        for mode, ext in MODES.items():
            cases[f"QUIT hangs {mode}"] = script(ext, quit={"action": "hang"})
            cases[f"QUIT dropped {mode}"] = script(ext, quit={"action": "drop"})
            cases[f"QUIT garbage {mode}"] = script(ext, quit={"raw": "garbage\r\n"})
            cases[f"close after 250 {mode}"] = script(ext, dot=reply(250, "2.0.0 ok",
                                                                     then="drop"))
        results = await self.run_cases(cases)

        def expect(label, server, report, elapsed):
            p = []
            if not report.all_delivered:
                p.append(summary(report))
            if len(server.delivered) != 1:
                p.append(f"messages {server.messages}")
            return p

        self.check_all(results, expect)

    # -------------------------------------------------------------- positive replies out of place

    @deferred_test
    async def test_a_positive_reply_where_none_belongs_is_not_a_delivery(self):
        cases = {}
        for mode, ext in MODES.items():
            cases[f"DATA 250 {mode}"] = script(ext, data=reply(250, "2.0.0 ok"))
            cases[f"DATA 221 {mode}"] = script(ext, data=reply(221, "2.0.0 bye"))
            cases[f"MAIL 251 {mode}"] = script(ext, mail=reply(251, "2.1.0 ok"))
        results = await self.run_cases(cases)
        # the invariant of check_all: nobody reported delivered without a message
        self.check_all(results, lambda *a: [])

    @deferred_test
    async def test_rcpt_answered_252_is_not_delivered_without_the_message(self):
        # With b the only recipient no DATA is sent at all.
        cases = {mode: script(ext, **{"rcpt:b@dest.test": reply(252, "2.1.5 cannot verify")})
                 for mode, ext in MODES.items()}
        results = await self.run_cases(cases, recipients=["b@dest.test"])
        self.check_all(results, lambda *a: [])

    @deferred_test
    async def test_extra_reply_lines_never_fake_a_delivery(self):
        cases = {}
        for mode, ext in MODES.items():
            cases[f"extra line after greeting {mode}"] = script(
                ext, greeting={"raw": "220 faulty.test ESMTP\r\n250 2.0.0 extra\r\n"})
            cases[f"two replies to EHLO {mode}"] = script(
                ext, ehlo={"raw": "250-faulty.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                                  "250 2.0.0 and once more\r\n"})
        results = await self.run_cases(cases, recipients=[f"r{i}@dest.test" for i in range(5)])
        self.check_all(results, lambda *a: [])


# --------------------------------------------------------------------------- daemon


class FaultyProcess:
    """``python tests/faulty_smtp.py`` in a subprocess, recording to a JSON-lines file."""

    def __init__(self, workdir: Path, name: str, script: dict, port: int = 0):
        self.workdir = workdir
        self.port_file = workdir / f"{name}.port"
        self.record = workdir / f"{name}.jsonl"
        self.log = workdir / f"{name}.log"
        self.script = script
        self.port = port
        self.proc = None

    def start(self, timeout: float = 10) -> FaultyProcess:
        cmd = [sys.executable, str(HERE.parent / "support" / "faulty_smtp.py"),
               "--script", json.dumps(self.script),
               "--port", str(self.port), "--port-file", str(self.port_file),
               "--record", str(self.record), "--max-lifetime", "120"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"faulty_smtp exited: {self.log.read_text()}")
            return self.port_file.exists() and self.port_file.read_text().strip()

        self.port = int(wait_for(ready, timeout, what="the faulty server's port file"))
        return self

    def events(self, kind: str) -> list[dict]:
        try:
            lines = self.record.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [e for e in map(json.loads, lines) if e["event"] == kind]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def test_daemon_defers_after_a_drop_after_the_final_dot_then_retry_delivers(tmp_path):
    q = tmp_path / "q"
    rcpt = "rcpt@dest.test"
    body = b"Subject: drop after dot\nMessage-ID: <dropdot@origin.test>\n\n.dot\nbody\n"
    r = subprocess.run([sys.executable, "-m", "twisted_mailout.daemon.cli", "sendmail", "--queue",
                        str(q), "-f", SENDER, rcpt], input=body, env=env(),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    qid = r.stdout.decode().strip()

    first = FaultyProcess(tmp_path, "first", {"stages": {"dot": {"action": "drop"}}}).start()
    second = None
    daemon = Daemon(q, f"--relay=127.0.0.1:{first.port}", "--retry-base=1", "--retry-max=2",
                    "--tls=none", "--command-timeout=3", "--connect-timeout=3",
                    log=tmp_path / "daemon.log")
    try:
        daemon.start()

        def deferred_after_drop():
            if not first.events("message"):
                return None
            rows = queue_list(q, detail=True)
            if len(rows) == 1 and rows[0]["recipients"][0]["state"] == "deferred":
                return rows[0]
            return None

        row = wait_for(deferred_after_drop, 30,
                       what="the recipient deferred after the drop",
                       detail=daemon.log)
        assert row["queue_id"] == qid
        [rc] = row["recipients"]
        assert rc["address"] == rcpt
        assert rc["reply"]["local"] is True and rc["reply"]["code"] == 421, rc
        assert "end of DATA" in rc["reply"]["text"], rc
        got = first.events("message")[0]
        assert got["reply"] is None and got["rcpt_tos"] == [rcpt]  # dropped, not answered
        sent_bytes = base64.b64decode(got["data_b64"])
        assert sent_bytes.endswith(b"\r\n.dot\r\nbody\r\n"), sent_bytes
        assert "status=sent" not in daemon.log() and "status=bounced" not in daemon.log()

        first.stop()
        second = FaultyProcess(tmp_path, "second", {}, port=first.port).start()
        wait_for(lambda: queue_list(q) == [], 30,
                 what="the retry to deliver and the queue to empty",
                 detail=daemon.log)
        delivered = [e for e in second.events("message") if e["reply"] == 250]
        assert len(delivered) == 1, second.events("message")
        assert delivered[0]["rcpt_tos"] == [rcpt]
        assert base64.b64decode(delivered[0]["data_b64"]) == sent_bytes
        log = daemon.log()
        assert f"to=<{rcpt}>" in log and "status=sent" in log, log
        assert "status=bounced" not in log, log
    finally:
        daemon.stop()
        first.stop()
        if second is not None:
            second.stop()
