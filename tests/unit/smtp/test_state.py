"""The sans-IO client state machine: the expected-code table, the transaction
rules, out-of-step replies, the STARTTLS buffer guard, batches."""

from __future__ import annotations

import pytest

from twisted_mailout.envelope import Reply
from twisted_mailout.smtp.errors import (
    LocalProtocolError,
    MalformedReply,
    OutOfStep,
    RemoteProtocolError,
    UnexpectedReply,
)
from twisted_mailout.smtp.replies import encode_reply
from twisted_mailout.smtp.sasl import CANCEL
from twisted_mailout.smtp.state import (
    NEED_DATA,
    Auth,
    AuthResponse,
    ClientConnection,
    Data,
    Ehlo,
    Helo,
    Quit,
    Rcpt,
    ReplyEvent,
    Rset,
    SendBody,
    StartTLS,
    State,
    Transaction,
    TransactionDone,
    Verb,
)


def feed(conn: ClientConnection, data: bytes) -> list:
    conn.receive_data(data)
    out = []
    while events := conn.next_events():
        out.extend(events)
    return out


def ready(*extensions: str) -> ClientConnection:
    c = ClientConnection()
    assert [e.verb for e in feed(c, b"220 mx ESMTP\r\n")] == [Verb.GREETING]
    assert c.send(Ehlo("client.example")) == b"EHLO client.example\r\n"
    feed(c, encode_reply(250, "\n".join(["mx", *extensions])))
    assert c.state is State.READY
    return c


def done(events) -> TransactionDone:
    [d] = [e for e in events if isinstance(e, TransactionDone)]
    return d


def run_unpipelined(c: ClientConnection, tx: Transaction, replies: list[bytes]) -> list:
    """Send MAIL, then what next_command() asks for after each reply."""
    events = []
    c.send(tx)
    for r in replies:
        events += feed(c, r)
        if (cmd := c.next_command()) is not None:
            c.send(cmd)
    return events


TX = Transaction("f@a.example", ("r1@b.example", "r2@b.example"))


def test_greeting_then_ehlo_extensions():
    c = ready("SIZE 100", "PIPELINING")
    assert c.extensions == {"SIZE": "100", "PIPELINING": ""}
    assert c.greeting == Reply(220, "mx ESMTP")
    assert c.awaiting() == ()


def test_refused_greeting_allows_only_quit():
    c = ClientConnection()
    [ev] = feed(c, b"554 go away\r\n")
    assert ev == ReplyEvent(Verb.GREETING, Reply(554, "go away"), False)
    assert c.state is State.REJECTED
    with pytest.raises(LocalProtocolError):
        c.send(Ehlo("x"))
    assert c.send(Quit()) == b"QUIT\r\n"
    assert c.awaiting() == ((Verb.QUIT, "quit"),)


@pytest.mark.parametrize("code", [250, 354, 221, 334])
def test_greeting_with_wrong_non_refusal_code_is_a_protocol_error(code):
    c = ClientConnection()
    with pytest.raises(UnexpectedReply):
        feed(c, b"%d hi\r\n" % code)
    assert c.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        c.next_event()


def test_ehlo_refused_then_helo():
    c = ClientConnection()
    feed(c, b"220 old\r\n")
    c.send(Ehlo("me"))
    [ev] = feed(c, b"502 no\r\n")
    assert not ev.ok and c.state is State.GREETED
    assert c.send(Helo("me")) == b"HELO me\r\n"
    feed(c, b"250 old\r\n")
    assert c.state is State.READY and c.extensions == {}


def test_extra_reply_after_greeting_is_out_of_step():
    c = ClientConnection()
    c.receive_data(b"220 mx\r\n250 surprise\r\n")
    [ev] = c.next_events()  # the batch stops: nothing is owed after the greeting
    assert ev.verb is Verb.GREETING
    c.send(Ehlo("me"))
    with pytest.raises(OutOfStep, match="before the EHLO command"):
        c.next_events()


def test_unsolicited_reply_when_idle_is_reported_and_421_marks_closing():
    c = ready()
    [ev] = feed(c, b"421 4.3.2 shutting down\r\n")
    assert ev.verb is None and c.closing


def test_starttls_guard_discards_bytes_after_220():
    c = ready("STARTTLS")
    c.send(StartTLS())
    events = feed(c, b"220 go ahead\r\n250-INJECTED\r\n250 PIPELINING\r\n250 parti")
    assert [e.verb for e in events] == [Verb.STARTTLS]
    assert c.state is State.TLS_PENDING and c.extensions == {}
    assert c.discarded == len(b"250-INJECTED\r\n250 PIPELINING\r\n250 parti")
    with pytest.raises(LocalProtocolError):
        c.send(Transaction("f@a", ("r@b",)))
    c.send(Ehlo("me"))
    feed(c, b"250-mx\r\n250 SIZE 9\r\n")
    assert c.extensions == {"SIZE": "9"} and c.state is State.READY


def test_starttls_refused_stays_ready():
    c = ready("STARTTLS")
    c.send(StartTLS())
    [ev] = feed(c, b"454 4.7.0 not now\r\n")
    assert not ev.ok and c.state is State.READY


def test_auth_challenge_and_cancel():
    c = ready("AUTH LOGIN")
    c.send(Auth("AUTH LOGIN"))
    [ev] = feed(c, b"334 VXNlcm5hbWU6\r\n")
    assert ev.ok and c.state is State.AUTH_CHALLENGED
    with pytest.raises(LocalProtocolError):
        c.send(Transaction("f@a", ("r@b",)))
    c.send(AuthResponse("dXNlcg=="))
    feed(c, b"334 UGFzc3dvcmQ6\r\n")
    assert c.send(AuthResponse(CANCEL)) == b"*\r\n"
    assert c.awaiting() == ((Verb.AUTH_CANCEL, "helo"),)
    [ev] = feed(c, b"501 cancelled\r\n")
    assert not ev.ok and c.state is State.READY
    assert "dXNlcg" not in repr(AuthResponse("dXNlcg=="))


@pytest.mark.parametrize("reply", [b"235 ok\r\n", b"334 again\r\n"])
def test_auth_cancel_answered_other_than_refusal_is_a_protocol_error(reply):
    c = ready("AUTH PLAIN")
    c.send(Auth("AUTH PLAIN x"))
    feed(c, b"334 \r\n")
    c.send(AuthResponse(CANCEL))
    with pytest.raises(UnexpectedReply):
        feed(c, reply)


def test_unpipelined_transaction_mixed_recipients():
    c = ready()
    tx = Transaction("f@a.example", ("ok@b", "no@b", "later@b"), " SIZE=10")
    assert c.send(tx) == b"MAIL FROM:<f@a.example> SIZE=10\r\n"
    assert c.next_command() is None  # the MAIL reply is owed
    feed(c, b"250 ok\r\n")
    assert c.next_command() == Rcpt("ok@b")
    with pytest.raises(LocalProtocolError):
        c.send(Rcpt("no@b"))  # out of order
    with pytest.raises(LocalProtocolError):
        c.send(Data())  # no recipient accepted yet
    sent = []
    for reply in (b"250 ok\r\n", b"550 unknown\r\n", b"451 greylisted\r\n"):
        sent.append(c.send(c.next_command()))
        feed(c, reply)
    assert sent == [b"RCPT TO:<ok@b>\r\n", b"RCPT TO:<no@b>\r\n", b"RCPT TO:<later@b>\r\n"]
    assert c.next_command() == Data()
    c.send(Data())
    events = feed(c, b"354 go\r\n")
    assert isinstance(events[-1], SendBody) and c.state is State.BODY
    assert c.send_body(b"hi\n.x") + c.end_data() == b"hi\r\n..x\r\n.\r\n"
    d = done(feed(c, b"250 queued\r\n"))
    assert d.replies == {"ok@b": Reply(250, "queued"), "no@b": Reply(550, "unknown"),
                         "later@b": Reply(451, "greylisted")}
    assert d.usable and not c.needs_rset and c.state is State.READY


def test_all_recipients_refused_no_data_and_rset_needed():
    c = ready()
    events = run_unpipelined(c, TX, [b"250 ok\r\n", b"550 no\r\n", b"450 later\r\n"])
    assert done(events).replies == {"r1@b.example": Reply(550, "no"),
                                    "r2@b.example": Reply(450, "later")}
    assert c.needs_rset
    with pytest.raises(LocalProtocolError, match="RSET first"):
        c.send(TX)
    c.send(Rset())
    feed(c, b"250 reset\r\n")
    assert not c.needs_rset
    assert c.send(TX).startswith(b"MAIL")


def test_mail_refused_unpipelined():
    c = ready()
    d = done(run_unpipelined(c, TX, [b"553 sender rejected\r\n"]))
    assert set(d.replies.values()) == {Reply(553, "sender rejected")}
    assert c.needs_rset


def test_pipelined_group_is_one_batch():
    c = ready("PIPELINING")
    tx = Transaction("f@a", ("r1@b", "r2@b", "r3@b"), pipelined=True)
    assert c.send(tx) == (b"MAIL FROM:<f@a>\r\nRCPT TO:<r1@b>\r\nRCPT TO:<r2@b>\r\n"
                          b"RCPT TO:<r3@b>\r\nDATA\r\n")
    assert [v for v, _ in c.awaiting()] == [Verb.MAIL, Verb.RCPT, Verb.RCPT, Verb.RCPT,
                                            Verb.DATA]
    c.receive_data(b"250 ok\r\n250 r1\r\n550 r2 unknown\r\n")
    assert len(c.next_events()) == 3
    assert c.next_events() == []
    c.receive_data(b"251 forwarded\r\n354 go\r\n")
    batch = c.next_events()
    assert [type(e).__name__ for e in batch] == ["ReplyEvent", "ReplyEvent", "SendBody"]
    c.send_body(b"x")
    c.end_data()
    d = done(feed(c, b"250 queued\r\n"))
    assert d.replies == {"r1@b": Reply(250, "queued"), "r2@b": Reply(550, "r2 unknown"),
                         "r3@b": Reply(250, "queued")}


def test_pipelined_mail_refused_rcpt_replies_mean_nothing():
    c = ready("PIPELINING")
    c.send(Transaction("f@a", ("r1@b",), pipelined=True))
    d = done(feed(c, b"451 later\r\n250 ok\r\n503 need MAIL\r\n"))
    assert d.replies == {"r1@b": Reply(451, "later")}
    assert c.needs_rset


def test_pipelined_354_without_accepted_recipient_is_a_protocol_error():
    c = ready("PIPELINING")
    c.send(Transaction("f@a", ("r1@b",), pipelined=True))
    with pytest.raises(UnexpectedReply, match="no recipient accepted") as e:
        feed(c, b"250 ok\r\n550 nope\r\n354 go\r\n")
    assert len(e.value.events) == 2  # MAIL and RCPT still count
    with pytest.raises(LocalProtocolError):
        c.end_data()
    assert c.transaction_replies(Reply(421, "local", True)) == {"r1@b": Reply(550, "nope")}


@pytest.mark.parametrize(("position", "bad"), [
    (0, b"354 go\r\n"), (0, b"334 what\r\n"), (0, b"251 forward\r\n"),
    (1, b"354 go\r\n"), (1, b"334 what\r\n"),
    (2, b"250 ok\r\n"), (2, b"334 what\r\n"), (2, b"220 hi\r\n"),
    (3, b"354 again\r\n"), (3, b"334 what\r\n"),
])
def test_3xx_or_wrong_2xx_in_mail_rcpt_data_dot_positions(position, bad):
    """MAIL, RCPT, DATA, final dot: a code that does not belong ends the
    session; the recipients are left to the caller's local deferral."""
    c = ready()
    c.send(Transaction("f@a", ("r1@b",)))
    good = [b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"]
    for reply in good[:position]:
        feed(c, reply)
        if (cmd := c.next_command()) is not None:
            c.send(cmd)
    if position == 3:
        c.end_data()
    with pytest.raises(UnexpectedReply):
        feed(c, bad)
    assert c.state is State.ERROR
    assert c.awaiting() == ()
    replies = c.transaction_replies(Reply(421, "4.5.0 protocol error", True))
    assert replies == {"r1@b": Reply(421, "4.5.0 protocol error", True)}


@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_1xx_anywhere_is_a_protocol_error(position):
    c = ready()
    c.send(Transaction("f@a", ("r1@b",)))
    for reply in [b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"][:position]:
        feed(c, reply)
        if (cmd := c.next_command()) is not None:
            c.send(cmd)
    if position == 3:
        c.end_data()
    with pytest.raises(MalformedReply):
        feed(c, b"150 wait\r\n")


def test_no_dot_or_body_without_354():
    c = ready()
    for f in (c.end_data, lambda: c.send_body(b"x")):
        with pytest.raises(LocalProtocolError):
            f()
    c.send(Transaction("f@a", ("r@b",)))
    feed(c, b"250 ok\r\n")
    c.send(c.next_command())
    feed(c, b"250 ok\r\n")
    c.send(c.next_command())
    done(feed(c, b"451 not now\r\n"))
    with pytest.raises(LocalProtocolError):
        c.end_data()


def test_second_reply_to_mail_is_out_of_step():
    c = ready()
    c.send(TX)
    c.receive_data(b"250 ok\r\n250 extra\r\n")
    c.next_events()
    c.send(c.next_command())  # RCPT goes out after the extra reply arrived
    with pytest.raises(OutOfStep):
        c.next_events()
    assert c.transaction_replies(Reply(421, "x", True))["r1@b.example"].local


def test_421_makes_the_connection_unusable():
    c = ready()
    d = done(run_unpipelined(c, TX, [b"421 4.3.2 bye\r\n"]))
    assert not d.usable and c.closing


def test_command_injection_and_misuse():
    c = ready()
    with pytest.raises(LocalProtocolError):
        c.send(Transaction("f@a", ("a@b>\r\nRSET",)))
    with pytest.raises(ValueError):
        c.send(Transaction("f@a\n", ("a@b",)))
    with pytest.raises(LocalProtocolError):
        c.send(Transaction("f@a", ()))
    with pytest.raises(LocalProtocolError):
        c.send(Ehlo("again"))  # EHLO only after the greeting or STARTTLS
    c.send(Rset())
    with pytest.raises(LocalProtocolError):
        c.send(Quit())  # a reply is owed


def test_quit_and_close():
    c = ready()
    c.send(Quit())
    [ev] = feed(c, b"221 bye\r\n")
    assert ev.ok and c.state is State.QUIT_SENT
    c.connection_closed()
    assert c.state is State.CLOSED and c.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        c.receive_data(b"x")
