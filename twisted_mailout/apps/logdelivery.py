"""C{log://}: deliver into Python's C{logging}, as marrow.mailer's logging
transport does.

Each message gives two records on one logger (marrow.mailer's
C{marrow/mailer/transport/log.py}, same format string and same levels):

  1. at C{level} (default C{INFO}), the line
     C{DELIVER {ID} {ISODATE} {SIZE} {AUTHOR} {RECIPIENTS}}, made by
     C{logger.log(level, "DELIVER %s %s %d %r %r", ...)}, e.g.::

       DELIVER <1@example.com> 2026-11-23T10:00:00+00:00 312
         AddressList("Ann <ann@example.com>") AddressList("bob@example.org")

     (one line; broken here to fit).

  2. at C{message_level} (default C{CRITICAL}, as marrow.mailer; C{off}
     leaves it out), the whole message as text.

The fields:

  - C{ID}: the message's C{Message-ID} field, angle brackets included (one
    is added when missing, as every delivery does);
  - C{ISODATE}: its C{Date} field as C{datetime.isoformat()} (with the
    offset the field gives; the time of sending, in UTC, when the field
    cannot be parsed);
  - C{SIZE}: the message's length in bytes (marrow.mailer counted the
    characters of C{str(message)}: the same for ASCII mail);
  - C{AUTHOR}: the C{From} field's addresses, C{AddressList("Name <a@b>")}
    as marrow.mailer's C{repr} prints them (a non-ASCII name RFC 2047
    encoded, as marrow.mailer's C{Address} does);
  - C{RECIPIENTS}: the envelope recipients, C{AddressList("a@b, c@d")}
    (marrow.mailer printed the To, Cc and Bcc fields: the envelope is what was
    "delivered" here).

The record's C{args} are those five values (the last two are
L{AddressList}, a C{list} of C{str}), so a handler can read them without
parsing the line.

URL: C{log://?name=mailer&level=info&message_level=critical}. C{name} is
the logger's name (default C{twisted_mailout.apps.logdelivery}, this
module's, as marrow.mailer used its own module's); the levels are names
(C{debug}, C{info}, C{warning}, C{error}, C{critical}, any case) or numbers.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted_mailout.apps.base import Delivery, MessageInput, Recipients, new_message_id, prepare
from twisted_mailout.message import header_values

__all__ = ["AddressList", "LogDelivery", "parse_level"]

#: The default logger name (marrow.mailer used its transport module's name).
DEFAULT_LOGGER = __name__

#: Level names a URL may give (C{logging}'s, plus C{warn} and C{fatal}).
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}

#: Words that turn the record of the message text off.
_OFF = ("off", "none", "no")


def parse_level(value: int | str | None, *, allow_off: bool = False) -> int | None:
    """A logging level from a name or a number.

    @param value: an C{int} (C{logging.INFO}), a level name in any case
        (C{"info"}, C{"WARNING"}), its number as text (C{"20"}); with
        C{allow_off}, L{None} or C{"off"}/C{"none"}/C{"no"} for no record.
    @param allow_off: whether "no record" may be asked for.
    @return: the level (C{int}), or L{None} for no record.
    @raise ValueError: an unknown name, a negative number, or "off" where
        it is not allowed.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        if allow_off:
            return None
        raise ValueError(f"a logging level is needed here, not {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"not a logging level: {value!r}")
    if isinstance(value, int):
        level = value
    else:
        text = value.strip().lower()
        if text in _LEVELS:
            return _LEVELS[text]
        try:
            level = int(text)
        except ValueError:
            raise ValueError(f"unknown logging level {value!r}; one of "
                             f"{', '.join(sorted(_LEVELS))} or a number") from None
    if level < 0:
        raise ValueError(f"a logging level is not negative: {value!r}")
    return level


def _level_text(level: int) -> str:
    """A level as a URL gives it: its name in lower case, else its number."""
    name = logging.getLevelName(level)
    return name.lower() if isinstance(name, str) and name.isalpha() else str(level)


class AddressList(list[str]):
    """A list of addresses whose C{repr} is marrow.mailer's:
    C{AddressList("a@b, Name <c@d>")}, or C{AddressList()} when empty."""

    def __repr__(self) -> str:
        """C{AddressList("...")} as marrow.mailer prints it.

        @return: the addresses joined by C{", "} inside C{AddressList("")}.
        """
        if not self:
            return "AddressList()"
        return 'AddressList("{}")'.format(", ".join(self))


def _author(data: bytes) -> AddressList:
    """The From field's addresses as marrow.mailer prints them.

    @param data: the message bytes.
    @return: C{formataddr((name, address))} of each mailbox (a non-ASCII
        name RFC 2047 encoded), in order.
    """
    pairs = email.utils.getaddresses(header_values(data, "From"))
    return AddressList(email.utils.formataddr(p) for p in pairs if p[1])


def _isodate(data: bytes) -> str:
    """The Date field as C{isoformat()}; now (UTC) when it cannot be parsed."""
    for value in header_values(data, "Date"):
        try:
            return email.utils.parsedate_to_datetime(value).isoformat()
        except (TypeError, ValueError, IndexError):
            break
    return datetime.datetime.now(datetime.UTC).isoformat()


class LogDelivery(Delivery):
    """Deliver into Python's C{logging} (see the module docstring): the
    C{DELIVER} line at C{level}, then the message text at C{message_level}.
    Synchronous and thread-safe (C{logging} is); nothing leaves the process.

    @param name: the logger's name; L{DEFAULT_LOGGER} when L{None}.
    @param level: the C{DELIVER} line's level (name or number, see
        L{parse_level}); C{INFO} by default, as marrow.mailer.
    @param message_level: the message text's level; C{CRITICAL} by default,
        as marrow.mailer; L{None} or C{"off"} for no such record.
    @param logger: a C{logging.Logger} to use instead of C{name}'s.
    @raise ValueError: a bad level, or both C{name} and C{logger}.
    """

    scheme = "log"

    def __init__(self, name: str | None = None, level: int | str = logging.INFO,
                 message_level: int | str | None = logging.CRITICAL,
                 logger: logging.Logger | None = None) -> None:
        if logger is not None and name is not None:
            raise ValueError("give name= or logger=, not both")
        self.logger = logger if logger is not None else logging.getLogger(
            name or DEFAULT_LOGGER)
        line_level = parse_level(level)
        assert line_level is not None  # parse_level refuses "off" here
        self.level: int = line_level
        self.message_level: int | None = parse_level(message_level, allow_off=True)
        self._lock = threading.Lock()

    @classmethod
    def url_arguments(cls, url: str) -> dict[str, Any]:
        """The constructor's keyword arguments from a C{log://} URL.

        @param url: C{log://} with optional C{?name=NAME&level=LEVEL&message_level=LEVEL}.
        @return: a dict of C{name}, C{level}, C{message_level} (those given).
        @raise ValueError: a host, path, port, user or fragment; an unknown
            or repeated parameter; a bad level.
        """
        parts = urlsplit(url)
        if parts.netloc or parts.path not in ("", "/") or parts.fragment:
            raise ValueError(f"{url}: log:// takes only parameters "
                             "(log://?name=mailer&level=info)")
        params = parse_qs(parts.query, keep_blank_values=True)
        out: dict[str, Any] = {}
        for key, values in params.items():
            if key not in ("name", "level", "message_level"):
                raise ValueError(f"{url}: unknown parameter {key!r} for log:// "
                                 "(name, level, message_level)")
            if len(values) != 1:
                raise ValueError(f"{url}: {key} given {len(values)} times")
            value = values[0]
            if key == "name":
                if not value:
                    raise ValueError(f"{url}: name needs a logger name")
                out[key] = value
            else:
                parse_level(value, allow_off=key == "message_level")  # checked here
                out[key] = value
        return out

    def url(self) -> str:
        """This delivery's URL: C{log://?name=...&level=...&message_level=...}."""
        body = "off" if self.message_level is None else _level_text(self.message_level)
        return (f"log://?name={self.logger.name}&level={_level_text(self.level)}"
                f"&message_level={body}")

    def send(self, sender: str | None, recipients: Recipients, message: MessageInput, *,
             message_id: str | None = None) -> str:
        """Log the message (two records, see the module docstring).

        @param sender: envelope sender; C{""}/C{"<>"}/L{None} for the null sender.
        @param recipients: envelope recipients (a C{str} is one).
        @param message: C{bytes}, C{str} or C{email.message.Message}.
        @param message_id: the id to return; a new one when L{None}.
        @return: the message id (L{new_message_id} format, not the Message-ID).
        @raise AddressError, MessageError: bad input; nothing logged.
        """
        env = prepare(sender, recipients, message)
        mid = message_id or new_message_id()
        ids = header_values(env.data, "Message-ID")
        args = (ids[0].strip() if ids else "", _isodate(env.data), len(env.data),
                _author(env.data), AddressList(env.recipients))
        with self._lock:  # the two records of one message stay together
            self.logger.log(self.level, "DELIVER %s %s %d %r %r", *args)
            if self.message_level is not None:
                self.logger.log(self.message_level, "%s",
                                env.data.decode("utf-8", "replace"))
        return mid
