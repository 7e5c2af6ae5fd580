"""The in-process peers, each run in its own child process by ``run.py``.

    python benchmarks/clients.py NAME --port P --messages N [--size S] [--queue DIR]

Each measures only its work, after its imports: wall time (perf_counter),
CPU (``getrusage(RUSAGE_SELF)``, user + system, all threads) and peak
resident memory (VmHWM, the whole process life), and prints one JSON
line: ``{"seconds", "cpu", "maxrss", "count", "t0"}`` (``t0``: wall-clock
``time.time()`` when the work started, for a parent timing from there).

Peers (every message 2 KB by default, one recipient, to 127.0.0.1:PORT):

* ``smtplib``: ``smtplib.SMTP`` on one connection, ``sendmail()`` per message.
* ``twisted``: ``twisted.mail.smtp.sendmail()`` (a new connection per message,
  as that function does), 10 in flight (a DeferredSemaphore).
* ``aiosmtplib``: 10 ``aiosmtplib.SMTP`` connections, kept open, taking
  messages from one asyncio queue.
* ``zope-enqueue``: zope.sendmail's ``QueuedMailDelivery(DIR).send()`` and a
  ``transaction.commit()`` per message (its maildir: write, close, rename,
  no fsync).
* ``zope-drain``: zope.sendmail's ``QueueProcessorThread`` with its
  ``SMTPMailer`` (a new connection per message, one message at a time, as it
  does), one pass over the maildir (``run(forever=False)``).
* ``mailout-enqueue``: ``twisted_mailout.enqueue()`` per message (durable:
  fsync of the file, rename, fsync of ``new/``).
* ``mailout-enqueue-many``: ``twisted_mailout.enqueue_many()`` in batches of
  ``--batch`` (one syncfs and one fsync of ``new/`` per batch).
* ``raw-fsync``: the floor for one durable file per message: create in
  ``tmp/``, write, fsync, close, rename into ``new/`` (no folder fsync).
* ``postfix-sendmail``: Postfix's ``sendmail(1)`` run once per message, one
  at a time, the message on its standard input (LF line ends, as a program
  hands mail to sendmail); ``--sendmail`` is the instance's command line
  (``sendmail -C ETC -i``, space-separated). A message counts as accepted
  when sendmail has exited 0 (postdrop has written it into the maildrop).
  ``cpu`` is the CPU of the sendmail and postdrop processes
  (``RUSAGE_CHILDREN``); ``cpu_self`` that of this loop (fork and exec).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RECIPIENT, SENDER, message


def _usage() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime + r.ru_stime


def _hwm() -> int:
    """VmHWM: peak resident memory of this program (ru_maxrss would also
    count the parent's memory from before exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _report(start: tuple[float, float], t0: float, count: int) -> None:
    t, cpu = _usage()
    rss = _hwm()
    print(json.dumps({"seconds": t - start[0], "cpu": cpu - start[1], "maxrss": rss,
                      "count": count, "t0": t0}))


def peer_smtplib(a, msgs):
    import smtplib

    t0, start = time.time(), _usage()
    with smtplib.SMTP("127.0.0.1", a.port) as s:
        for m in msgs:
            s.sendmail(SENDER, [RECIPIENT], m)
    _report(start, t0, len(msgs))


def peer_twisted(a, msgs):
    from twisted.internet import defer, task
    from twisted.mail.smtp import sendmail

    def main(reactor):
        sem = defer.DeferredSemaphore(a.concurrency)
        t0, start = time.time(), _usage()
        ds = [sem.run(sendmail, "127.0.0.1", SENDER, [RECIPIENT], m, port=a.port,
                      requireTransportSecurity=False, requireAuthentication=False)
              for m in msgs]
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addCallback(lambda _: _report(start, t0, len(msgs)))
        return d

    task.react(main)  # exits the process (status 1 if main failed)


def peer_aiosmtplib(a, msgs):
    import asyncio

    import aiosmtplib

    async def main():
        q: asyncio.Queue = asyncio.Queue()
        for m in msgs:
            q.put_nowait(m)
        t0, start = time.time(), _usage()

        async def worker():
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=a.port, start_tls=False)
            await client.connect()
            try:
                while True:
                    try:
                        m = q.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    await client.sendmail(SENDER, [RECIPIENT], m)
            finally:
                await client.quit()

        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        _report(start, t0, len(msgs))

    asyncio.run(main())


def peer_zope_enqueue(a, msgs):
    import transaction
    from zope.sendmail.delivery import QueuedMailDelivery

    delivery = QueuedMailDelivery(a.queue)
    t0, start = time.time(), _usage()
    for m in msgs:
        transaction.begin()
        delivery.send(SENDER, [RECIPIENT], m)
        transaction.commit()
    _report(start, t0, len(msgs))


def peer_zope_drain(a, msgs):
    import logging

    from zope.sendmail.mailer import SMTPMailer
    from zope.sendmail.queue import QueueProcessorThread

    logging.basicConfig(level=logging.WARNING)  # its per-message INFO line goes nowhere
    proc = QueueProcessorThread(interval=0.05)
    proc.setMailer(SMTPMailer("127.0.0.1", a.port, no_tls=True))
    proc.setQueuePath(a.queue)
    count = sum(len(os.listdir(os.path.join(a.queue, s))) for s in ("new", "cur"))
    t0, start = time.time(), _usage()
    proc.run(forever=False)
    left = sum(len([n for n in os.listdir(os.path.join(a.queue, s)) if not n.startswith(".")])
               for s in ("new", "cur"))
    if left:
        raise SystemExit(f"zope.sendmail left {left} messages")
    _report(start, t0, count)


def peer_mailout_enqueue(a, msgs):
    from twisted_mailout import enqueue

    t0, start = time.time(), _usage()
    for m in msgs:
        enqueue(a.queue, SENDER, [RECIPIENT], m)
    _report(start, t0, len(msgs))


def peer_mailout_enqueue_many(a, msgs):
    from twisted_mailout import enqueue_many

    t0, start = time.time(), _usage()
    for i in range(0, len(msgs), a.batch):
        enqueue_many(a.queue, [(SENDER, [RECIPIENT], m) for m in msgs[i:i + a.batch]])
    _report(start, t0, len(msgs))


def peer_raw_fsync(a, msgs):
    tmp, new = os.path.join(a.queue, "tmp"), os.path.join(a.queue, "new")
    os.makedirs(tmp, exist_ok=True)
    os.makedirs(new, exist_ok=True)
    t0, start = time.time(), _usage()
    for i, m in enumerate(msgs):
        name = f"{time.time_ns()}.{i}"
        path = os.path.join(tmp, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, m)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(path, os.path.join(new, name))
    _report(start, t0, len(msgs))


def peer_postfix_sendmail(a, msgs):
    import subprocess

    cmd = [*a.sendmail.split(), "-f", SENDER, RECIPIENT]
    lf = [m.replace(b"\r\n", b"\n") for m in msgs]
    t0, start = time.time(), _usage()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    for m in lf:
        r = subprocess.run(cmd, input=m, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if r.returncode != 0:
            raise SystemExit(f"sendmail exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    t, cpu = _usage()
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    print(json.dumps({"seconds": t - start[0], "cpu": children, "cpu_self": cpu - start[1],
                      "maxrss": _hwm(), "count": len(msgs), "t0": t0}))


PEERS = {
    "smtplib": peer_smtplib,
    "twisted": peer_twisted,
    "aiosmtplib": peer_aiosmtplib,
    "zope-enqueue": peer_zope_enqueue,
    "zope-drain": peer_zope_drain,
    "mailout-enqueue": peer_mailout_enqueue,
    "mailout-enqueue-many": peer_mailout_enqueue_many,
    "raw-fsync": peer_raw_fsync,
    "postfix-sendmail": peer_postfix_sendmail,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("peer", choices=sorted(PEERS))
    ap.add_argument("--port", type=int, default=25)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--queue", default="")
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--sendmail", default="/usr/sbin/sendmail -i",
                    help="postfix-sendmail: the sendmail command line, space-separated")
    a = ap.parse_args()
    msgs = [message(i, a.size) for i in range(a.messages)]
    PEERS[a.peer](a, msgs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
