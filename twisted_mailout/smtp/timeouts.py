"""Per-command SMTP client timeouts (RFC 5321 4.5.3.2).

Pure data: the Twisted driver (L{twisted_mailout.smtp.protocol}) turns them
into timers, choosing the one to arm from the state machine's
L{ClientConnection.awaiting<twisted_mailout.smtp.state.ClientConnection.awaiting>}.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["QUIT_LIMIT", "Timeouts"]

#: The longest wait for the reply to QUIT, in seconds: the session is over
#: either way, so it is not worth RFC 5321's five minutes.
QUIT_LIMIT = 10.0


@dataclass(frozen=True)
class Timeouts:
    """Per-command timeouts in seconds (RFC 5321 4.5.3.2 minimums by default).

    @ivar connect: TCP connect.
    @ivar greeting: initial 220 message (4.5.3.2.1: 5 minutes).
    @ivar helo: EHLO/HELO, STARTTLS, AUTH, RSET, QUIT (4.5.3.2 does not
        name them; 5 minutes like MAIL).
    @ivar mail: MAIL command (4.5.3.2.2: 5 minutes).
    @ivar rcpt: each RCPT command (4.5.3.2.3: 5 minutes).
    @ivar data: DATA initiation (4.5.3.2.4: 2 minutes).
    @ivar data_block: each block of message data written (4.5.3.2.5: 3 minutes).
    @ivar data_done: reply to the final dot (4.5.3.2.6: 10 minutes).
    """

    connect: float = 30.0
    greeting: float = 300.0
    helo: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_block: float = 180.0
    data_done: float = 600.0

    @property
    def quit(self) -> float:
        """The wait for the reply to QUIT, and then for the close: C{helo},
        at most L{QUIT_LIMIT} seconds."""
        return min(self.helo, QUIT_LIMIT)

    def get(self, key: str) -> float:
        """The timeout named C{key} (a field name, or C{"quit"}), in seconds.

        @raise AttributeError: no such timeout.
        """
        value: float = getattr(self, key)
        return value

    @classmethod
    def scaled(cls, limit: float) -> Timeouts:
        """Every timeout capped at C{limit} seconds (for tests and impatient
        programmatic callers).

        @param limit: seconds.
        """
        d = cls()
        return cls(**{f.name: min(getattr(d, f.name), limit) for f in fields(cls)})
