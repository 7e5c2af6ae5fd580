"""A small message is read once: the bytes pickup read serve its first send."""

from __future__ import annotations

import os

from twisted_mailout.queue.store import Queue

MSG = b"Subject: hi\r\n\r\nbody\r\n"


def test_the_first_send_uses_the_bytes_read_at_pickup(tmp_path):
    q = Queue(str(tmp_path))
    small = q.enqueue("a@example.com", ["b@example.org"], MSG)
    big = q.enqueue("a@example.com", ["b@example.org"], MSG + b"x" * 200_000 + b"\r\n")
    entries = {e.qid: e for e in q.pickup().entries}
    # the file of the small one is not read again (even gone, its bytes are there)
    os.rename(tmp_path / "messages" / small, tmp_path / "moved")
    with q.open_body(entries[small]) as f:
        assert f.read().endswith(MSG)
    with q.open_body(entries[big]) as f:  # too big to have been read whole
        assert f.read().endswith(b"x\r\n")
    os.rename(tmp_path / "moved", tmp_path / "messages" / small)
    q.remove_many([small])
    assert q._bodies == {} and q._body_bytes == 0


def test_a_tried_message_is_read_from_its_file_and_the_cache_is_bounded(tmp_path):
    q = Queue(str(tmp_path))
    q.BODY_CACHE = 3 * len(MSG) + 400  # about three messages with their headers
    qids = q.enqueue_many([("a@example.com", ["b@example.org"], MSG)] * 10)
    entries = {e.qid: e for e in q.pickup().entries}
    assert 1 <= len(q._bodies) <= 3 and q._body_bytes <= q.BODY_CACHE
    e = entries[next(iter(q._bodies))]
    e.recipients[0].attempts = 1  # deferred after its first attempt
    q.save_many([e])
    assert e.qid not in q._bodies
    for qid in qids:
        with q.open_body(entries[qid]) as f:
            assert f.read().endswith(MSG)
