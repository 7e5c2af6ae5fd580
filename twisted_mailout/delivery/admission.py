"""Admission: which due recipients of a message may be attempted now.

Before each attempt the scheduler asks L{Admission.admit}. A recipient is
held back, with no attempt counted, while:

  - its domain is suspended (the operator's C{mailout queue suspend}, or a
    throttling rule), or its whole provider is (a rule with C{scope =
    "provider"} suspends the shaping key C{"provider:NAME"});
  - its destination's message rate (traffic shaping, C{max_message_rate})
    has no free slot now: the message takes the next slot and is scheduled
    for it, so mail waiting for its slot holds no place among the messages
    in flight and the mail to other destinations flows past it (a rate
    delays mail; it never defers or bounces it).

L{Admission.until} gives the time a held-back recipient may go, for the
scheduler's next-attempt time. No I/O besides the first classification of a
destination (its MX lookup, through the router's cache).
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted_mailout.delivery.destinations import RELAY_KEY
from twisted_mailout.delivery.shaping import Shape, Shaper
from twisted_mailout.delivery.suspend import Suspensions, domain_of
from twisted_mailout.envelope import parse_address
from twisted_mailout.queue.model import RecipientStatus

__all__ = ["Admission"]

#: A slot this close (seconds) counts as now: timers are not exact.
_EARLY = 0.002


class Admission:
    """Suspensions and message-rate slots, per message and destination.

    @param suspensions: the L{Suspensions} in force.
    @param shaper: the L{Shaper} of traffic shaping, or L{None}.
    @param relay: C{True} when every message goes to one relay.
    """

    def __init__(self, suspensions: Suspensions, shaper: Shaper | None = None,
                 relay: bool = False) -> None:
        self.suspensions = suspensions
        self.shaper = shaper
        self.relay = relay
        #: C{{(queue id, destination): slot time}}: slots taken, not used yet.
        self._slots: dict[tuple[str, str], float] = {}

    @property
    def active(self) -> bool:
        """Whether anything can hold a recipient back (else L{admit} need
        not be called)."""
        return self.shaper is not None or len(self.suspensions) > 0

    def destination(self, address: str) -> str:
        """The destination key of a recipient address (the connector's)."""
        if self.relay:
            return RELAY_KEY
        try:
            return parse_address(address).ascii_domain
        except ValueError:
            return domain_of(address)

    def _suspended(self, address: str, dest: str, now: float) -> float | None:
        until = self.suspensions.until(domain_of(address), now)
        if self.shaper is not None:
            shape = self.shaper.cached(dest)
            if shape is not None and shape.provider is not None:
                p = self.suspensions.until(shape.key, now)
                if p is not None:
                    until = p if until is None else max(until, p)
        return until

    def held(self, dest: str, now: float) -> bool:
        """Whether destination C{dest} (or its provider) is suspended at
        C{now} (the connector's last check before a transaction)."""
        if not len(self.suspensions):
            return False
        if self.suspensions.until(dest, now) is not None:
            return True
        shape = self.shaper.cached(dest) if self.shaper is not None else None
        return (shape is not None and shape.provider is not None
                and self.suspensions.until(shape.key, now) is not None)

    def until(self, qid: str, address: str, now: float) -> float | None:
        """When recipient C{address} of message C{qid} may be attempted, or
        L{None} when nothing holds it back at C{now}."""
        if not self.active:
            return None
        dest = self.destination(address)
        until = self._suspended(address, dest, now)
        slot = self._slots.get((qid, dest))
        if slot is not None and slot > now + _EARLY:
            until = slot if until is None else max(until, slot)
        return until

    async def admit(self, qid: str, due: list[RecipientStatus], now: float
                    ) -> tuple[list[RecipientStatus], bool]:
        """The recipients of C{due} that may be attempted now.

        @param qid: the message's queue id.
        @param due: its due recipients.
        @param now: seconds since the epoch.
        @return: C{(admitted, paced)}: the recipients to attempt now, and
            whether their destinations' message-rate slots are taken (the
            connector must not take them again: L{Connector.deliver}'s
            C{paced}).
        """
        by_dest: dict[str, list[RecipientStatus]] = {}
        for rs in due:
            by_dest.setdefault(self.destination(rs.address), []).append(rs)
        admitted: list[RecipientStatus] = []
        paced = False
        for dest, waiting in by_dest.items():
            shape: Shape | None = None
            if self.shaper is not None:
                shape = self.shaper.cached(dest) or await self.shaper.classify(dest)
            members = [rs for rs in waiting if self._suspended(rs.address, dest, now) is None]
            if not members:
                continue
            if shape is not None and self.shaper is not None:
                slot = self._slots.pop((qid, dest), None)
                if slot is None:
                    if self.shaper.message_rate(shape, now) is None:
                        admitted += members
                        continue
                    slot = self.shaper.message_slot(shape, now)
                if slot > now + _EARLY:
                    self._slots[(qid, dest)] = slot  # kept: the message waits for it
                    continue
                paced = True
            admitted += members
        return admitted, paced

    def forget(self, qids: Iterable[str]) -> None:
        """Drop the slots held by messages that left the queue."""
        gone = set(qids)
        if gone and self._slots:
            for k in [k for k in self._slots if k[0] in gone]:
                del self._slots[k]
