"""Destinations: how the recipients of one message are split into
transactions.

With MX routing each recipient domain is a destination (its A-label form is
the key the router resolves, RFC 5321 5.1); with a relay every recipient goes
to the one destination L{RELAY_KEY}. One transaction is made per destination.
The scheduler and the client (L{twisted_mailout.api.SMTPClient}) both group
with L{group_by_destination}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from twisted_mailout.envelope import Address

__all__ = ["RELAY_KEY", "group_by_destination"]

T = TypeVar("T")

#: The destination key of every recipient when mail goes to a relay.
RELAY_KEY = "relay"


def group_by_destination(items: Iterable[T], address_of: Callable[[T], Address],
                         relay: bool) -> dict[str, list[T]]:
    """Recipients grouped by destination, in first-seen order: one group per
    recipient domain (its A-label form, the MX routing key, RFC 5321 5.1), or
    one group L{RELAY_KEY} when everything goes to a relay.

    @param items: recipients in any form.
    @param address_of: gives an item's validated L{Address}.
    @param relay: C{True} when mail goes to a relay.
    @return: C{{destination key: [items]}}, keys and items in first-seen order.
    """
    groups: dict[str, list[T]] = {}
    for item in items:
        key = RELAY_KEY if relay else address_of(item).ascii_domain
        groups.setdefault(key, []).append(item)
    return groups
