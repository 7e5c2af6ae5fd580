"""C{mock://}: a delivery that succeeds, fails or is exhausted at random,
for testing delivery managers (marrow.mailer's C{MockTransport}).

URL: C{mock://?success=1.0&failure=0.0&exhaustion=0.0&seed=42}. Each
probability is a number from 0 to 1 (inclusive); C{seed} (an integer)
makes the run repeatable. Each C{send} draws, in marrow.mailer's order:

  1. with probability C{failure}: L{DeliveryError}, deferred
     (C{451 4.3.0 Mock failure.}): marrow.mailer's
     C{TransportFailedException}, "retry, with a new transport";
  2. with probability C{exhaustion}: the message is taken (it is in
     L{MockDelivery.outbox}), then L{TransportExhausted} is raised: marrow.mailer's
     C{TransportExhaustedException}, "delivered, but make a new transport
     for the next message". The delivery refuses every later C{send}
     (C{RuntimeError}), so a manager that keeps using it is caught;
  3. with probability C{1 - success}: L{DeliveryError}, bounced
     (C{550 5.3.0 Mock rejection.}): marrow.mailer's transport returned
     C{False}, a message not delivered and not to be retried;
  4. otherwise the message is taken: it is appended to
     L{MockDelivery.outbox} and its id returned.

A draw is made only when its probability is neither 0 nor certain, so
C{mock://} (success 1, the others 0) draws nothing. Departures from
marrow.mailer: the probabilities are exact (marrow.mailer drew
C{randint(0, 100001) / 100000}, so its C{failure=1.0} let 2 messages in
100,002 through), a probability above 1 is refused, and exhaustion ends the
delivery's use.
"""

from __future__ import annotations

import random
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted_mailout.apps.base import Delivery, MessageInput, Recipients, new_message_id, prepare
from twisted_mailout.apps.local import SentMessage
from twisted_mailout.envelope import Reply
from twisted_mailout.errors import DeliveryError, MailoutError

__all__ = ["MockDelivery", "TransportExhausted"]

#: The reply of a mock failure (deferred: a new transport may succeed).
FAILURE_REPLY = Reply(451, "4.3.0 Mock failure.", True)

#: The reply of a mock rejection (bounced).
REJECTION_REPLY = Reply(550, "5.3.0 Mock rejection.", True)


class TransportExhausted(MailoutError):
    """A delivery took the message but must not be used again: make a new
    one for the next message (marrow.mailer's C{TransportExhaustedException}).

    The message I{was} delivered: a manager counts it as sent and does not
    send it again.

    @ivar message_id: the id of the message it took (C{str}).
    @ivar recipients: its envelope recipients (C{list[str]}).
    @ivar delivery: the exhausted delivery (a L{Delivery}).
    """

    def __init__(self, message_id: str, recipients: list[str], delivery: Delivery) -> None:
        """
        @param message_id: the id of the message the delivery took.
        @param recipients: its envelope recipients.
        @param delivery: the delivery that is now exhausted.
        """
        self.message_id = message_id
        self.recipients = list(recipients)
        self.delivery = delivery
        super().__init__(f"{delivery.url()} took message {message_id} and is exhausted: "
                         "use a new delivery for the next message")


def _probability(value: Any, name: str) -> float:
    """A probability from 0 to 1 inclusive.

    @param value: a number, or its text.
    @param name: the parameter's name, for the message.
    @return: the C{float}.
    @raise ValueError: not a number, not finite, or outside [0, 1].
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number from 0 to 1, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number from 0 to 1, not {value!r}") from None
    if not 0.0 <= number <= 1.0:  # NaN fails this too
        raise ValueError(f"{name} must be a number from 0 to 1, not {value!r}")
    return number


class MockDelivery(Delivery):
    """Succeed, fail or be exhausted at random (see the module docstring).
    Synchronous and thread-safe: the draws of one C{send} are made under a
    lock, so a seeded delivery gives the same sequence of outcomes for the
    same sequence of calls.

    @param success: probability that a message that neither failed nor
        exhausted the delivery is taken (else it is rejected, bounced).
    @param failure: probability of a L{DeliveryError} (deferred).
    @param exhaustion: probability that the message is taken and
        L{TransportExhausted} raised.
    @param seed: seed of this delivery's own C{random.Random}; L{None} for an
        unseeded one.
    @ivar outbox: the messages taken (L{SentMessage}s), in order.
    @ivar exhausted: C{True} once L{TransportExhausted} was raised.
    @raise ValueError: a probability outside [0, 1] or a seed that is not
        an integer.
    """

    scheme = "mock"

    def __init__(self, success: float | str = 1.0, failure: float | str = 0.0,
                 exhaustion: float | str = 0.0, seed: int | str | None = None) -> None:
        self.success = _probability(success, "success")
        self.failure = _probability(failure, "failure")
        self.exhaustion = _probability(exhaustion, "exhaustion")
        if seed is not None:
            try:
                if isinstance(seed, bool) or float(seed) != int(seed):
                    raise ValueError
                seed = int(seed)
            except (TypeError, ValueError):
                raise ValueError(f"seed must be an integer, not {seed!r}") from None
        self.seed: int | None = seed
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.outbox: list[SentMessage] = []
        self.exhausted = False

    @classmethod
    def url_arguments(cls, url: str) -> dict[str, Any]:
        """The constructor's keyword arguments from a C{mock://} URL.

        @param url: C{mock://} with optional C{?success=P&failure=P&exhaustion=P&seed=N}.
        @return: a dict of those given (probabilities as C{float}, the seed as C{int}).
        @raise ValueError: a host, path or fragment; an unknown or repeated
            parameter; a bad number.
        """
        parts = urlsplit(url)
        if parts.netloc or parts.path not in ("", "/") or parts.fragment:
            raise ValueError(f"{url}: mock:// takes only parameters "
                             "(mock://?success=0.9&failure=0.05&exhaustion=0.01&seed=1)")
        out: dict[str, Any] = {}
        for key, values in parse_qs(parts.query, keep_blank_values=True).items():
            if key not in ("success", "failure", "exhaustion", "seed"):
                raise ValueError(f"{url}: unknown parameter {key!r} for mock:// "
                                 "(success, failure, exhaustion, seed)")
            if len(values) != 1:
                raise ValueError(f"{url}: {key} given {len(values)} times")
            if key == "seed":
                try:
                    out[key] = int(values[0])
                except ValueError:
                    raise ValueError(f"{url}: seed must be an integer, "
                                     f"not {values[0]!r}") from None
            else:
                out[key] = _probability(values[0], key)
        return out

    def url(self) -> str:
        """This delivery's URL, with every parameter."""
        seed = "" if self.seed is None else f"&seed={self.seed}"
        return (f"mock://?success={self.success:g}&failure={self.failure:g}"
                f"&exhaustion={self.exhaustion:g}{seed}")

    def _happens(self, probability: float) -> bool:
        """One draw (under the lock): C{True} with C{probability}; no draw
        when it is 0 or 1."""
        if probability <= 0.0:
            return False
        if probability >= 1.0:
            return True
        return self._random.random() < probability

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> str:
        """Take, fail or reject the message at random (see the module docstring).

        @return: the message id (given, or a new one) when it is taken.
        @raise DeliveryError: a mock failure (deferred, 451 4.3.0) or
            rejection (bounced, 550 5.3.0).
        @raise TransportExhausted: the message was taken and this delivery
            is exhausted.
        @raise RuntimeError: this delivery was exhausted by an earlier message.
        @raise AddressError, MessageError: bad input (no draw is made).
        """
        env = prepare(sender, recipients, message)
        mid = message_id or new_message_id()
        with self._lock:
            if self.exhausted:
                raise RuntimeError(f"{self.url()} is exhausted: a manager must replace it "
                                   "after TransportExhausted")
            if self._happens(self.failure):
                raise DeliveryError(FAILURE_REPLY, env.recipients)
            if self._happens(self.exhaustion):
                self.outbox.append(SentMessage(mid, env.sender, env.recipients, env.data))
                self.exhausted = True
                raise TransportExhausted(mid, env.recipients, self)
            if not self._happens(self.success):
                raise DeliveryError(REJECTION_REPLY, env.recipients)
            self.outbox.append(SentMessage(mid, env.sender, env.recipients, env.data))
        return mid
