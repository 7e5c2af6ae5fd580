"""C{mailout demo}: the main job on this machine, with no outside network.

Starts a DNS server (twisted.names) serving a small zone and SMTP receivers
(Twisted's server side) on loopback addresses, enqueues messages to several
domains, runs the real L{DeliveryService} against them, and prints each
recipient's outcome and where the bounces went. It exits by itself.

The domains:

- C{alpha.test}: one MX; both recipients accepted.
- C{beta.test}: its preferred MX is dead (nothing listens), the backup MX
  takes the mail.
- C{gamma.test}: the MX answers 550 for C{nobody@gamma.test}, so that
  recipient bounces and a delivery status notification goes back to the
  sender's domain, C{demo.test}, whose MX receives it.
- C{nowhere.test}: does not exist (NXDOMAIN): bounced at once.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from typing import Any, TextIO

from twisted.internet import defer, error, task

from twisted_mailout.daemon.config import Config
from twisted_mailout.queue.store import enqueue
from twisted_mailout.daemon.service import DeliveryService
from twisted_mailout.testing.loopback import start_dns_server, start_smtp_receiver

__all__ = ["ZONE_HOSTS", "main", "run"]

# MX host name -> loopback address; the dead one gets no receiver.
ZONE_HOSTS = {
    "mx.alpha.test": "127.0.0.2",
    "dead.beta.test": "127.0.0.9",
    "mx.beta.test": "127.0.0.3",
    "mx.gamma.test": "127.0.0.4",
    "mx.demo.test": "127.0.0.5",
}

MESSAGES = [
    ("alice@demo.test", ["bob@alpha.test", "carol@alpha.test"], "Hello alpha"),
    ("alice@demo.test", ["dave@beta.test"], "Through the backup MX"),
    ("alice@demo.test", ["erin@gamma.test", "nobody@gamma.test"], "One good, one refused"),
    ("alice@demo.test", ["frank@nowhere.test"], "To a domain that does not exist"),
]


def _zone() -> dict[str, Any]:
    records: dict[str, dict[str, list[Any]]] = {
        "alpha.test": {"MX": [[10, "mx.alpha.test"]]},
        "beta.test": {"MX": [[10, "dead.beta.test"], [20, "mx.beta.test"]]},
        "gamma.test": {"MX": [[10, "mx.gamma.test"]]},
        "demo.test": {"MX": [[10, "mx.demo.test"]]},
    }
    for host, ip in ZONE_HOSTS.items():
        records[host] = {"A": [ip]}
    return {"ttl": 300, "records": records, "authoritative_for": ["test"]}


def _refuse_nobody(rcpt: str) -> tuple[int, str] | None:
    if rcpt.lower().startswith("nobody@"):
        return (550, "5.1.1 <nobody@gamma.test>: Recipient address rejected: no such user")
    return None


async def run(reactor: Any, queue_dir: str, timeout: float, out: TextIO = sys.stdout) -> int:
    """Run the demo on C{reactor}; print to C{out}.

    @param queue_dir: an empty or new queue folder, or a PostgreSQL queue
        (C{postgresql://...}) whose schema is up to date and which holds no
        other mail.
    @param timeout: seconds before giving up.
    @return: 0 when every outcome was the expected one, else 1.
    """
    if queue_dir.startswith(("postgresql://", "postgres://")):
        from twisted_mailout.errors import QueueError
        from twisted_mailout.queue.postgres import PostgresStore

        try:
            store = PostgresStore(queue_dir)
        except QueueError as e:
            print(f"mailout demo: {e}", file=out)
            return 1
        waiting = len(store.list_entries())
        store.close()
        if waiting:
            print(f"mailout demo: {store.location} already holds {waiting} messages; give "
                  "the demo an empty queue", file=out)
            return 1
    udp, tcp, dns_port = start_dns_server(_zone(), reactor)
    ports = [udp, tcp]
    receivers: dict[str, Any] = {}
    smtp_port: int | None = None
    for _attempt in range(20):
        try:
            for host, ip in ZONE_HOSTS.items():
                if host.startswith("dead."):
                    continue
                policy = _refuse_nobody if host == "mx.gamma.test" else None
                lp, rec = start_smtp_receiver(reactor, ip, smtp_port or 0, host, policy)
                smtp_port = lp.getHost().port
                ports.append(lp)
                receivers[host] = rec
            break
        except error.CannotListenError:
            for p in ports[2:]:
                p.stopListening()
            del ports[2:]
            receivers.clear()
            smtp_port = None
    else:
        print("mailout demo: could not find a free port on the loopback addresses", file=out)
        return 1
    assert smtp_port is not None
    print(f"DNS server (twisted.names) on 127.0.0.1:{dns_port}; SMTP receivers on port "
          f"{smtp_port} at " + ", ".join(f"{h} [{ZONE_HOSTS[h]}]" for h in receivers), file=out)
    print(f"dead.beta.test [{ZONE_HOSTS['dead.beta.test']}] has no server (preferred MX of "
          "beta.test)", file=out)

    for sender, rcpts, subject in MESSAGES:
        msg = (f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\n"
               f"This message was sent by mailout demo.\r\n")
        qid = enqueue(queue_dir, sender, rcpts, msg)
        print(f"queued {qid}: {sender} -> {', '.join(rcpts)}", file=out)

    outcomes: list[Any] = []
    config = Config(queue=queue_dir, resolvers=(f"127.0.0.1:{dns_port}",), mx_port=smtp_port,
                    helo="demo.mailout.test", tls="may", poll_interval=0.2, retry_base=3600,
                    retry_max=3600, connection_idle=0.5, command_timeout=10, connect_timeout=5,
                    dns_timeout=5)
    svc = DeliveryService(config, reactor, observers=[outcomes.append])
    svc.startService()
    # four delivered recipients, two bounced ones, and the two bounce reports
    expected_final = 4 + 2 + 2
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        await task.deferLater(reactor, 0.1, lambda: None)
        finals = [o for o in outcomes if o.status.is_final]
        if len(finals) >= expected_final and svc.scheduler.idle:
            break
    await svc.stopService()
    for p in ports:
        await defer.maybeDeferred(p.stopListening)

    print("\nOutcomes (one line per recipient, as logged):", file=out)
    for o in outcomes:
        print(f"  {o.qid}: to=<{o.recipient}> relay={o.relay or 'none'} "
              f"status={o.status.log_word} "
              f"({o.reply.one_line()})", file=out)
    print("\nWhat each receiver got:", file=out)
    for host, rec in receivers.items():
        for m in rec.messages:
            subject = ""
            for line in m["data"].split(b"\r\n"):
                if line.lower().startswith(b"subject:"):
                    subject = line[8:].strip().decode("utf-8", "replace")
                    break
            kind = "bounce (DSN)" if m["mail_from"] in ("", "<>") else "message"
            print(f"  {host}: {kind} from=<{m['mail_from']}> to={m['rcpt_tos']} "
                  f"subject={subject!r}", file=out)
    by = {(o.recipient, o.status) for o in outcomes}
    want = {("bob@alpha.test", "delivered"), ("carol@alpha.test", "delivered"),
            ("dave@beta.test", "delivered"), ("erin@gamma.test", "delivered"),
            ("nobody@gamma.test", "bounced"), ("frank@nowhere.test", "bounced"),
            ("alice@demo.test", "delivered")}
    missing = want - by
    if missing:
        print(f"\nmailout demo: unexpected outcomes, missing {sorted(missing)}", file=out)
        return 1
    print("\nAll outcomes as expected: 4 delivered (one through the backup MX), 2 bounced, "
          "and their 2 bounce reports delivered to the sender's MX (mx.demo.test).", file=out)
    return 0


def main(args: argparse.Namespace) -> int:
    """Entry point for C{mailout demo}.

    Runs L{run} under C{twisted.internet.task.react} (which installs the
    signal handlers and stops the reactor when L{run} ends).

    @param args: the parsed command line, with C{queue} (a folder, or L{None}
        for a temporary one removed afterwards) and C{timeout} (seconds).
    @return: the exit status: 0 when every expected outcome was seen.
    """
    queue_dir = args.queue
    cleanup = None
    if queue_dir is None:
        cleanup = queue_dir = tempfile.mkdtemp(prefix="mailout-demo-")

    async def _main(reactor: Any) -> None:
        status = await run(reactor, queue_dir, args.timeout)
        if status:
            raise SystemExit(status)

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(_main(reactor)))
    except SystemExit as e:  # react always ends by exiting, with run's status
        return e.code if isinstance(e.code, int) else 1
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
    return 0
