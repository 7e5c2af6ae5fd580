"""Crash safety, proven: SIGKILL at random moments while draining thousands of
messages to a real SMTP server (aiosmtpd), restart each time, and account for
every message. A duplicate is allowed only for a message the server had
accepted while we had not yet recorded it (it was in flight at the kill): after
each kill the test counts exactly those (received, yet still queued), and the
duplicates seen at the end must equal that count.

The run is seeded: MAILOUT_CRASH_SEED (an integer) picks the message sizes and
the moments of the kills (a delay after each run's first delivery), and
defaults to a fixed value, so a failure can be rerun (the timing of the
processes still varies); every failure names the seed.

After each kill the test waits until the server has finished with every
session of the killed daemon (the sink's open-session count back to zero):
only then is what the server received final, and the count exact."""

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

#: The seed used unless MAILOUT_CRASH_SEED says otherwise.
DEFAULT_SEED = 20261203


def queued_ids(q) -> set[str]:
    """Queue ids still in the queue (waiting for pickup or active)."""
    names = set()
    for sub in ("new", "messages"):
        try:
            names.update(n for n in os.listdir(os.path.join(q, sub)) if not n.startswith("."))
        except FileNotFoundError:
            pass
    return names


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    seed = int(os.environ.get("MAILOUT_CRASH_SEED", DEFAULT_SEED))
    rng = random.Random(seed)
    rerun = f"seed {seed} (MAILOUT_CRASH_SEED={seed} to rerun)"
    print(f"\n{rerun}")
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
            # kill while it is delivering: after its first message of this
            # run reached the server, at a random moment
            before = len(sink.messages)
            wait_for(lambda: len(sink.messages) > before or not queued_ids(q), 60,
                     what=f"run {kills} to deliver something")
            time.sleep(rng.uniform(0.0, 0.6))
            d.kill()
            kills += 1
            # the killed daemon's sessions end at the server: what it had
            # sent has been handled (or dropped with its session) by now
            sink.wait_idle(timeout=60)
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
        sink.wait_idle(timeout=60)
        got = [email.message_from_bytes(m["data"])["Message-ID"] for m in sink.messages]
        missing = set(msgid_of.values()) - set(got)
        assert not missing, f"{len(missing)} messages never arrived"
        duplicates = len(got) - len(set(got))
        assert duplicates == predicted, \
            f"{duplicates} duplicates, {predicted} predicted (in flight {in_flight})"
        # accepted but not yet recorded: at most the messages being worked on
        # at once (max(50, 10 x connections)), whose removal may wait on fsync
        assert all(k <= max(50, 10 * MAX_CONNECTIONS) for k in in_flight), \
            f"in flight at the kills: {in_flight}"
        assert queue_list(q) == []
        print(f"{n} messages, {kills} SIGKILLs, in flight at each kill {in_flight}, "
              f"duplicates {duplicates} (= messages in flight at the kills)")
    except BaseException as exc:
        exc.add_note(rerun)  # every failure says how to rerun it
        raise
    finally:
        sink.stop()
