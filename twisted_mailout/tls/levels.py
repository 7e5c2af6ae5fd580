"""The TLS security levels: the one list every layer checks a level against.

The levels are Postfix's (U{https://www.postfix.org/TLS_README.html}); what
each one means is described in L{twisted_mailout.tls.policy}. This module
holds only the names so that the configuration, the SMTP session, the
programmatic API and the application deliveries can all import it without
pulling in certificate code.
"""

from __future__ import annotations

from typing import Final

__all__ = ["LEVELS", "REQUIRED", "check_level"]

#: Every TLS level, weakest first: C{none}, C{may}, C{encrypt}, C{verify},
#: C{secure}, C{dane}, C{dane-only}.
LEVELS: Final[tuple[str, ...]] = ("none", "may", "encrypt", "verify", "secure", "dane",
                                  "dane-only")

#: Levels under which a host without working TLS is not used (the mail is
#: deferred instead of being sent in plaintext).
REQUIRED: Final[frozenset[str]] = frozenset({"encrypt", "verify", "secure", "dane-only"})


def check_level(level: str, what: str = "TLS level") -> str:
    """Refuse a level that is not one of L{LEVELS}.

    @param level: the level to check.
    @param what: how to name it in the error (e.g. C{"--tls"}).
    @return: C{level}, unchanged.
    @raise ValueError: C{level} is not in L{LEVELS}; the message lists them.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown {what} {level!r}; expected one of {', '.join(LEVELS)}")
    return level
