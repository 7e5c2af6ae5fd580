"""The sans-IO state machine with CHUNKING (RFC 3030): BDAT chunks instead of
DATA, pipelined and not; the replies to chunks (250, 4xx, 5xx), the rule of
no more chunks after a refusal, the reply owed when a timeout ends it."""

from __future__ import annotations

import pytest

from tests.unit.smtp.test_state import done, feed, ready
from twisted_mailout.envelope import Reply
from twisted_mailout.smtp.errors import LocalProtocolError, UnexpectedReply
from twisted_mailout.smtp.state import (
    Data,
    Quit,
    Rcpt,
    ReplyEvent,
    SendBody,
    State,
    Transaction,
    TransactionDone,
    Verb,
)

R1, R2 = "r1@b.example", "r2@b.example"


def tx(pipelined: bool = True, *recipients: str) -> Transaction:
    return Transaction("f@a.example", recipients or (R1, R2), pipelined=pipelined,
                       chunking=True)


def test_pipelined_no_data_command_and_chunks_may_follow_at_once():
    c = ready("PIPELINING", "CHUNKING")
    wire = c.send(tx())
    assert wire == (b"MAIL FROM:<f@a.example>\r\nRCPT TO:<r1@b.example>\r\n"
                    b"RCPT TO:<r2@b.example>\r\n")
    assert c.state is State.BODY and c.body_wanted()
    assert c.send_chunk(b"Subject: x\n\n.body\n") == b"BDAT 21\r\nSubject: x\r\n\r\n.body\r\n"
    assert c.send_chunk(b"end", last=True) == b"BDAT 5 LAST\r\nend\r\n"
    assert c.state is State.DOT_SENT and not c.body_wanted()
    assert [v for v, _ in c.awaiting()] == [Verb.MAIL, Verb.RCPT, Verb.RCPT, Verb.BDAT,
                                            Verb.BDAT_LAST]
    assert c.awaiting()[-2:] == ((Verb.BDAT, "data_block"), (Verb.BDAT_LAST, "data_done"))
    events = feed(c, b"250 ok\r\n250 ok\r\n550 no\r\n250 2.0.0 chunk\r\n250 2.0.0 queued\r\n")
    assert [type(e) for e in events] == [ReplyEvent] * 5 + [TransactionDone]
    d = done(events)
    assert d.replies == {R1: Reply(250, "2.0.0 queued"), R2: Reply(550, "no")}
    assert d.usable and not c.needs_rset and c.state is State.READY


def test_a_held_back_cr_makes_no_empty_chunk():
    c = ready("PIPELINING", "CHUNKING")
    c.send(tx())
    assert c.send_chunk(b"a\r") == b"BDAT 1\r\na"
    assert c.send_chunk(b"") == b""  # nothing yet: no command, no reply owed
    assert [v for v, _ in c.awaiting()][-1] is Verb.BDAT
    assert len(c.awaiting()) == 4
    assert c.send_chunk(b"\nb", last=True) == b"BDAT 5 LAST\r\n\r\nb\r\n"
    c2 = ready("PIPELINING", "CHUNKING")
    c2.send(tx())
    assert c2.send_chunk(b"\r") == b""  # a lone CR: held back
    assert c2.send_chunk(b"", last=True) == b"BDAT 2 LAST\r\n\r\n"


@pytest.mark.parametrize("refusal", [b"552 5.3.4 too big", b"451 4.3.0 disk full"])
def test_refused_chunk_ends_the_transaction_once_the_chunks_sent_are_answered(refusal):
    c = ready("PIPELINING", "CHUNKING")
    c.send(tx())
    c.send_chunk(b"one\r\n")
    c.send_chunk(b"two\r\n")
    events = feed(c, b"250 ok\r\n250 ok\r\n250 ok\r\n" + refusal + b"\r\n")
    assert not any(isinstance(e, TransactionDone) for e in events)
    assert c.state is State.BDAT_STOPPED and not c.body_wanted()
    with pytest.raises(LocalProtocolError):  # RFC 3030 2: no chunk after a refused one
        c.send_chunk(b"three\r\n", last=True)
    events = feed(c, b"503 5.5.1 bad sequence\r\n")  # the second chunk's reply
    code = int(refusal[:3])
    d = done(events)
    assert {r: rep.code for r, rep in d.replies.items()} == {R1: code, R2: code}
    assert c.needs_rset and c.state is State.READY
    with pytest.raises(LocalProtocolError):  # RSET first
        c.send(Transaction("f@a.example", (R1,), chunking=True))


def test_refusal_after_last_was_sent_still_decides():
    c = ready("PIPELINING", "CHUNKING")
    c.send(tx())
    c.send_chunk(b"one\r\n")
    c.send_chunk(b"two\r\n", last=True)
    events = feed(c, b"250 ok\r\n250 ok\r\n250 ok\r\n554 5.6.0 bad chunk\r\n")
    assert not any(isinstance(e, TransactionDone) for e in events)
    assert c.state is State.DOT_SENT
    # Even a 250 to LAST after a refused chunk delivers nobody.
    d = done(feed(c, b"250 2.0.0 queued\r\n"))
    assert d.replies == {R1: Reply(554, "5.6.0 bad chunk"), R2: Reply(554, "5.6.0 bad chunk")}
    assert c.needs_rset


@pytest.mark.parametrize("refusal", [b"552 5.3.4 too big", b"451 4.3.0 later"])
def test_refused_last_chunk(refusal):
    c = ready("PIPELINING", "CHUNKING")
    c.send(tx())
    c.send_chunk(b"all\r\n", last=True)
    d = done(feed(c, b"250 ok\r\n250 ok\r\n250 ok\r\n" + refusal + b"\r\n"))
    assert {r: rep.code for r, rep in d.replies.items()} == {R1: int(refusal[:3]),
                                                             R2: int(refusal[:3])}
    assert c.needs_rset


def test_every_rcpt_refused_stops_the_chunks():
    c = ready("PIPELINING", "CHUNKING")
    c.send(tx())
    c.send_chunk(b"one\r\n")
    events = feed(c, b"250 ok\r\n550 no\r\n450 later\r\n")
    assert c.state is State.BDAT_STOPPED and not c.body_wanted()
    assert not any(isinstance(e, TransactionDone) for e in events)
    d = done(feed(c, b"554 5.5.1 no valid recipients\r\n"))
    assert d.replies == {R1: Reply(550, "no"), R2: Reply(450, "later")}
    assert c.needs_rset


def test_every_rcpt_refused_before_any_chunk_ends_at_once():
    c = ready("PIPELINING", "CHUNKING")
    c.send(tx())
    d = done(feed(c, b"250 ok\r\n550 no\r\n550 no\r\n"))
    assert set(d.replies) == {R1, R2} and c.needs_rset and c.state is State.READY


def test_mail_refused_pipelined_waits_for_every_reply():
    c = ready("PIPELINING", "CHUNKING")
    c.send(tx())
    c.send_chunk(b"x\r\n", last=True)
    events = feed(c, b"553 5.7.1 sender\r\n250 ok\r\n")
    assert not any(isinstance(e, TransactionDone) for e in events)
    d = done(feed(c, b"250 ok\r\n503 5.5.1 no MAIL\r\n"))
    assert d.replies == {R1: Reply(553, "5.7.1 sender"), R2: Reply(553, "5.7.1 sender")}
    assert c.needs_rset


def test_unpipelined_each_chunk_waits_for_its_250():
    c = ready("CHUNKING")
    assert c.send(tx(False)) == b"MAIL FROM:<f@a.example>\r\n"
    assert not c.body_wanted()
    feed(c, b"250 ok\r\n")
    assert c.send(c.next_command()) == b"RCPT TO:<r1@b.example>\r\n"
    feed(c, b"250 ok\r\n")
    assert c.send(c.next_command()) == b"RCPT TO:<r2@b.example>\r\n"
    with pytest.raises(LocalProtocolError):
        c.send_chunk(b"early")
    events = feed(c, b"550 no\r\n")
    assert isinstance(events[-1], SendBody) and c.next_command() is None
    with pytest.raises(LocalProtocolError):
        c.send(Data())  # never DATA in a CHUNKING transaction
    assert c.send_chunk(b"one\n") == b"BDAT 5\r\none\r\n"
    assert not c.body_wanted()
    with pytest.raises(LocalProtocolError):
        c.send_chunk(b"two")  # the 250 to the first chunk comes first
    events = feed(c, b"250 2.0.0 ok\r\n")
    assert isinstance(events[-1], SendBody) and c.body_wanted()
    assert c.send_chunk(b"two", last=True) == b"BDAT 5 LAST\r\ntwo\r\n"
    d = done(feed(c, b"250 2.0.0 queued\r\n"))
    assert d.replies == {R1: Reply(250, "2.0.0 queued"), R2: Reply(550, "no")}
    assert not c.needs_rset


def test_unpipelined_refused_chunk_ends_it():
    c = ready("CHUNKING")
    c.send(tx(False, R1))
    feed(c, b"250 ok\r\n")
    c.send(Rcpt(R1))
    feed(c, b"250 ok\r\n")
    c.send_chunk(b"one\n")
    d = done(feed(c, b"452 4.3.1 full\r\n"))
    assert d.replies == {R1: Reply(452, "4.3.1 full")}
    assert c.needs_rset


def test_unpipelined_every_rcpt_refused_no_chunk():
    c = ready("CHUNKING")
    c.send(tx(False, R1))
    feed(c, b"250 ok\r\n")
    c.send(Rcpt(R1))
    events = feed(c, b"550 no\r\n")
    assert not any(isinstance(e, SendBody) for e in events)
    assert done(events).replies == {R1: Reply(550, "no")}
    assert not c.body_wanted()


@pytest.mark.parametrize("bad", [b"354 go", b"251 forwarded", b"334 what"])
def test_wrong_codes_to_a_chunk_are_protocol_errors(bad):
    c = ready("PIPELINING", "CHUNKING")
    c.send(tx())
    c.send_chunk(b"one\r\n")
    with pytest.raises(UnexpectedReply) as e:
        feed(c, b"250 ok\r\n250 ok\r\n250 ok\r\n" + bad + b"\r\n")
    assert e.value.verb is Verb.BDAT
    assert c.state is State.ERROR


def test_timeout_replies_for_undecided_recipients():
    # The driver times the first reply owed (here the LAST chunk's, with the
    # data_done timeout) and ends the transaction: undecided recipients get
    # its local reply, decided ones keep theirs.
    c = ready("PIPELINING", "CHUNKING")
    c.send(tx())
    c.send_chunk(b"x\r\n", last=True)
    feed(c, b"250 ok\r\n250 ok\r\n550 no\r\n")
    assert c.awaiting() == ((Verb.BDAT_LAST, "data_done"),)
    assert c.timeout_key() == "data_done"
    timeout = Reply(421, "4.4.2 timeout", local=True)
    assert c.transaction_replies(timeout) == {R1: timeout, R2: Reply(550, "no")}
    with pytest.raises(LocalProtocolError):
        c.send_chunk(b"more")


def test_no_chunk_without_chunking_and_no_quit_mid_body():
    c = ready("PIPELINING", "CHUNKING")
    with pytest.raises(LocalProtocolError):
        c.send_chunk(b"x")
    c.send(Transaction("f@a.example", (R1,), pipelined=True))  # DATA, not chunking
    with pytest.raises(LocalProtocolError):
        c.send_chunk(b"x")
    c2 = ready("PIPELINING", "CHUNKING")
    c2.send(tx())
    with pytest.raises(LocalProtocolError):
        c2.send(Quit())
