"""Hypothesis drives the sans-IO state machine with arbitrary commands,
reply sequences and chunkings (stateful testing).

Whatever the server says, the machine:
  - raises nothing but its documented errors (RemoteProtocolError from
    next_events, LocalProtocolError from send/send_body/end_data);
  - never emits the final dot unless DATA was answered 354 in this
    transaction (tracked here independently, from the replies fed);
  - never reports a recipient delivered (a 2xx in TransactionDone) unless
    its RCPT and the final dot were both answered 2xx;
  - with CHUNKING (BDAT, RFC 3030): never sends a chunk after a refused
    chunk, a refused MAIL or every RCPT refused, nor (unpipelined) before the
    RCPT replies or while a chunk's reply is owed; never reports a recipient
    delivered unless its RCPT, every chunk and BDAT LAST were answered 2xx.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from twisted_mailout.smtp.errors import LocalProtocolError, RemoteProtocolError
from twisted_mailout.smtp.replies import encode_reply
from twisted_mailout.smtp.sasl import CANCEL
from twisted_mailout.smtp.state import (
    Auth,
    AuthResponse,
    ClientConnection,
    Data,
    Ehlo,
    Helo,
    Quit,
    Rcpt,
    Rset,
    StartTLS,
    State,
    Transaction,
    TransactionDone,
    Verb,
)

CODES = [220, 221, 235, 250, 251, 252, 334, 354, 421, 450, 451, 500, 501, 503, 550, 554,
         150, 199, 300, 399]
GOOD = {Verb.GREETING: [220], Verb.EHLO: [250], Verb.HELO: [250], Verb.STARTTLS: [220],
        Verb.AUTH: [235, 334], Verb.AUTH_CANCEL: [501], Verb.MAIL: [250], Verb.RCPT: [250, 251],
        Verb.DATA: [354], Verb.END_OF_DATA: [250], Verb.RSET: [250], Verb.QUIT: [221],
        Verb.BDAT: [250], Verb.BDAT_LAST: [250]}
RECIPIENTS = ["a@x.example", "b@x.example", "c@x.example"]

texts = st.lists(st.sampled_from(["ok", "mx.example", "PIPELINING", "", "x y"]),
                 min_size=1, max_size=3).map("\n".join)


class StateMachineUnderFire(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.conn = ClientConnection()
        self.dead = False  # a RemoteProtocolError ended the session
        self.owed: list[tuple[Verb, str | None]] = [(Verb.GREETING, None)]
        self.auth = False  # inside an AUTH exchange
        self.tx: tuple[str, ...] | None = None  # the recipients of the open transaction
        self.rcpt_code: dict[str, int] = {}
        self.got354 = False
        self.dot_code: int | None = None  # the final dot's reply, or BDAT LAST's
        self.chunking = False  # the open transaction sends BDAT
        self.pipelined = False
        self.mail_code: int | None = None
        self.chunk_refused = False  # a chunk was answered other than 2xx
        self.last_sent = False

    # -- what the client sends ---------------------------------------------

    def _sent(self, verbs):
        self.owed.extend(verbs)

    def _try(self, command):
        try:
            return self.conn.send(command)
        except LocalProtocolError:
            return None

    @precondition(lambda self: not self.dead)
    @rule(which=st.sampled_from(["natural"] * 6 + ["ehlo", "helo", "starttls", "auth",
                                                   "answer", "cancel", "rset", "quit",
                                                   "next", "transaction", "dot"]),
          n=st.integers(1, 3), pipelined=st.booleans(), body=st.binary(max_size=20),
          chunking=st.booleans(), last=st.booleans())
    def client_sends(self, which, n, pipelined, body, chunking, last):
        """Mostly what a client would do next; sometimes anything at all."""
        conn = self.conn
        if which == "natural":
            which = {State.GREETED: "ehlo", State.READY: "transaction",
                     State.IN_TRANSACTION: "next", State.BODY: "dot",
                     State.AUTH_CHALLENGED: "answer"}.get(conn.state, "quit")
        if which == "transaction":
            self.begin_transaction(n, pipelined, chunking)
        elif which == "dot" and self.chunking:
            self.send_chunk(body, last)
        elif which == "dot":
            self.end_of_data(body)
        else:
            self.send_command(which)

    def send_command(self, which):
        conn = self.conn
        command = {"ehlo": Ehlo("c.example"), "helo": Helo("c.example"),
                   "starttls": StartTLS(), "auth": Auth("AUTH LOGIN"),
                   "answer": AuthResponse("dXNlcg=="), "cancel": AuthResponse(CANCEL),
                   "rset": Rset(), "quit": Quit(), "next": conn.next_command()}[which]
        if command is None:
            return
        if self._try(command) is None:
            return
        verb = {Ehlo: Verb.EHLO, Helo: Verb.HELO, StartTLS: Verb.STARTTLS, Auth: Verb.AUTH,
                Rset: Verb.RSET, Quit: Verb.QUIT, Data: Verb.DATA, Rcpt: Verb.RCPT}.get(
                    type(command))
        if isinstance(command, AuthResponse):
            verb = Verb.AUTH_CANCEL if command.line == CANCEL else Verb.AUTH
        self._sent([(verb, getattr(command, "recipient", None))])

    def begin_transaction(self, n, pipelined, chunking=False):
        recipients = tuple(RECIPIENTS[:n])
        wire = self._try(Transaction("f@x.example", recipients, "", pipelined, chunking))
        if wire is None:
            return
        self.tx, self.rcpt_code, self.got354, self.dot_code = recipients, {}, False, None
        self.chunking, self.pipelined, self.mail_code = chunking, pipelined, None
        self.chunk_refused = self.last_sent = False
        verbs = [(Verb.MAIL, None)]
        if pipelined:
            verbs += [(Verb.RCPT, r) for r in recipients]
            if not chunking:
                verbs.append((Verb.DATA, None))
        assert wire.count(b"\r\n") == len(verbs)
        self._sent(verbs)

    def end_of_data(self, body):
        try:
            self.conn.send_body(body)
            self.conn.end_data()
        except LocalProtocolError:
            return
        # The dot went out: only ever after a 354 in this transaction.
        assert self.got354 and self.dot_code is None and self.tx is not None
        self.got354 = False
        self._sent([(Verb.END_OF_DATA, None)])

    def send_chunk(self, body, last):
        try:
            wire = self.conn.send_chunk(body, last)
        except LocalProtocolError:
            return
        # A chunk only in an open CHUNKING transaction that may still succeed.
        assert self.tx is not None and self.chunking and not self.last_sent
        assert not self.chunk_refused
        assert self.mail_code in (None, 250)
        rcpts_in = len(self.rcpt_code) == len(self.tx)
        assert not (rcpts_in and not any(c // 100 == 2 for c in self.rcpt_code.values()))
        if not self.pipelined:  # after the RCPT replies, one chunk reply at a time
            assert rcpts_in and not self.owed
        if not wire:
            return
        event("BDAT LAST sent" if last else "BDAT chunk sent")
        self.last_sent = last
        self._sent([(Verb.BDAT_LAST if last else Verb.BDAT, None)])

    # -- what the server says ----------------------------------------------

    @precondition(lambda self: not self.dead)
    @rule(data=st.data())
    def server_replies(self, data):
        # Mostly codes that make sense for the reply owed (so transactions get
        # far), sometimes any code at all.
        batch = []
        extra = data.draw(st.sampled_from([0] * 8 + [1, 2]))  # unsolicited ones
        for i in range(data.draw(st.integers(1, max(1, len(self.owed)))) + extra):
            verb = self.owed[i][0] if i < len(self.owed) else None
            good = GOOD[verb] if verb else []
            code = data.draw(st.sampled_from([*good * 30, *[451, 550, 554] * 8, *CODES]))
            text = data.draw(texts)
            batch.append((code, text))
        wire = b"".join(encode_reply(c, t) for c, t in batch)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=4)))
        model = list(batch)
        conn = self.conn
        for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            if a == b:
                continue
            conn.receive_data(wire[a:b])
            try:
                while events := conn.next_events():
                    for ev in events:
                        self._check(ev, model)
            except RemoteProtocolError as e:
                event(f"error: {e.why[:30]}")
                for ev in e.events:
                    self._check(ev, model)
                self.dead = True
                assert conn.state is State.ERROR
                return

    def _check(self, ev, model):
        if isinstance(ev, TransactionDone):
            assert self.tx is not None
            assert set(ev.replies) == set(self.tx)
            event("transaction done, some delivered" if any(
                r.is_positive for r in ev.replies.values()) else "transaction done, none delivered")
            for r, reply in ev.replies.items():
                if reply.is_positive:
                    assert self.rcpt_code.get(r, 0) // 100 == 2, (r, self.rcpt_code)
                    assert self.dot_code is not None and self.dot_code // 100 == 2
                    assert not self.chunk_refused
            self.tx = None
            return
        if not hasattr(ev, "reply"):
            return  # SendBody
        code, _ = model.pop(0)
        assert ev.reply.code == code
        if not self.owed:
            assert ev.verb is None
            return
        verb, recipient = self.owed.pop(0)
        assert ev.verb is verb
        if verb is Verb.RCPT:
            self.rcpt_code[recipient] = code
        elif verb is Verb.DATA:
            self.got354 = code == 354
        elif verb is Verb.END_OF_DATA or verb is Verb.BDAT_LAST:
            self.dot_code = code
        elif verb is Verb.MAIL:
            self.mail_code = code
        if verb in (Verb.BDAT, Verb.BDAT_LAST) and code // 100 != 2:
            self.chunk_refused = True

    @precondition(lambda self: not self.dead)
    @rule(junk=st.binary(min_size=1, max_size=12), really=st.integers(0, 99))
    def server_garbage(self, junk, really):
        if really:
            return  # rarely: it ends the run
        self.conn.receive_data(junk + b"\r\n")
        try:
            while self.conn.next_events():
                pass
        except RemoteProtocolError:
            self.dead = True
        else:
            self.dead = True  # the model cannot follow what the junk meant; stop here

    @precondition(lambda self: self.dead)
    @rule(which=st.sampled_from(["event", "send", "dot"]))
    def after_the_end(self, which):
        # Once the server broke the protocol, nothing more happens.
        if self.conn.state is not State.ERROR:
            return  # ended by unparseable junk that happened to be valid
        try:
            if which == "event":
                self.conn.next_event()
            elif which == "send":
                self.conn.send(Quit())
            else:
                self.conn.end_data()
        except (RemoteProtocolError, LocalProtocolError):
            return
        raise AssertionError("the machine went on after a protocol error")

    def teardown(self):
        event(f"ended in {self.conn.state.value}")

    @invariant()
    def owed_matches(self):
        if not self.dead:
            assert [v for v, _ in self.conn.awaiting()] == [v for v, _ in self.owed]


TestStateMachineUnderFire = StateMachineUnderFire.TestCase
TestStateMachineUnderFire.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
