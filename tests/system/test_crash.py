"""Crash safety, proven: SIGKILL at random moments while draining thousands of
messages to a real SMTP server (aiosmtpd), restart each time, and account for
every message. A duplicate is allowed only for a message the server had
accepted while we had not yet recorded it (it was in flight at the kill): after
each kill the test counts exactly those (received, yet still queued), and the
duplicates seen at the end must equal that count."""

from __future__ import annotations

import email
import os
import random
import time
from collections import Counter

from tests.support.peers import AiosmtpdSink

from tests.support.daemon import Daemon, queue_list
from tests.support.wait import wait_for
from twisted_mailout.queue.store import Queue

MAX_CONNECTIONS = 5


def queued_ids(q) -> set[str]:
    """Queue ids still in the queue (waiting for pickup or active)."""
    names = set()
    for sub in ("new", "messages"):
        try:
            names.update(n for n in os.listdir(os.path.join(q, sub)) if not n.startswith("."))
        except FileNotFoundError:
            pass
    return names


def settle(sink, quiet: float = 0.5, limit: float = 10.0) -> None:
    """Wait until the server has received nothing new for `quiet` seconds
    (at most `limit` seconds): bytes the killed daemon had already sent may
    still be in the server's hands, more slowly on a loaded machine."""
    deadline = time.monotonic() + limit
    count, since = len(sink.messages), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.05)
        if len(sink.messages) != count:
            count, since = len(sink.messages), time.monotonic()


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    seed = int(os.environ.get("MAILOUT_CRASH_SEED", time.time()))
    rng = random.Random(seed)
    print(f"\nseed {seed} (set MAILOUT_CRASH_SEED to repeat)")
    sink = AiosmtpdSink("127.0.0.1").start()
    q = tmp_path / "q"
    queue = Queue(str(q))
    msgid_of = {}
    n = 3000
    for i in range(n):
        mid = f"<crash{i}@mailout.test>"
        body = (f"Message-ID: {mid}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
                f"Subject: {i}\r\n\r\n" + ("x" * 70 + "\r\n") * rng.randrange(0, 80)).encode()
        msgid_of[queue.enqueue("s@origin.test", [f"r{i}@dest.test"], body)] = mid
    relay = f"--relay=127.0.0.1:{sink.port}"
    deadline = time.monotonic() + 240
    kills, predicted, in_flight, counted = 0, 0, [], {}
    try:
        while time.monotonic() < deadline:
            d = Daemon(q, relay, f"--max-connections={MAX_CONNECTIONS}",
                       f"--max-per-destination={MAX_CONNECTIONS}",
                       log=tmp_path / f"run{kills}.log").start()
            if kills >= 12 or not queued_ids(q):
                try:
                    wait_for(lambda: not queued_ids(q), 120, what="an empty queue")
                finally:
                    d.stop()
                break
            time.sleep(rng.uniform(0.4, 1.6))
            d.kill()
            kills += 1
            settle(sink)  # let the server finish reading what was already sent
            receptions = Counter(email.message_from_bytes(m["data"])["Message-ID"]
                                 for m in sink.messages)
            # accepted by the server (since we last counted it), yet still
            # queued: these will be sent again
            again = [qid for qid in queued_ids(q)
                     if receptions[msgid_of.get(qid)] > counted.get(qid, 0)]
            for qid in again:
                counted[qid] = receptions[msgid_of[qid]]
            in_flight.append(len(again))
            predicted += len(again)
        got = [email.message_from_bytes(m["data"])["Message-ID"] for m in sink.messages]
        assert set(got) == set(msgid_of.values()), "every acknowledged message arrived"
        duplicates = len(got) - len(set(got))
        assert duplicates == predicted, (duplicates, predicted)
        # accepted but not yet recorded: at most the messages being worked on
        # at once (max(50, 10 x connections)), whose removal may wait on fsync
        assert all(k <= max(50, 10 * MAX_CONNECTIONS) for k in in_flight), in_flight
        assert queue_list(q) == []
        print(f"{n} messages, {kills} SIGKILLs, in flight at each kill {in_flight}, "
              f"duplicates {duplicates} (= messages in flight at the kills)")
    finally:
        sink.stop()
