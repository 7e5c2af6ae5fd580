"""ESMTP service extensions (RFC 5321 4.1.1.1, 2.2) as a server lists them in
its EHLO reply, and the helpers that decide what we may use. Pure; modelled
on aiosmtplib's C{esmtp.py}.
"""

from __future__ import annotations

__all__ = [
    "auth_mechanisms",
    "mail_parameters",
    "max_size",
    "parse_ehlo",
    "supports_8bitmime",
    "supports_chunking",
    "supports_pipelining",
    "supports_smtputf8",
    "supports_starttls",
]

Extensions = dict[str, str]


def parse_ehlo(text: str) -> Extensions:
    """The extensions of an EHLO reply.

    @param text: the reply text (L{Reply.text<twisted_mailout.envelope.Reply>}:
        lines joined by C{"\\n"}, codes removed); its first line is the
        server's greeting and is skipped.
    @return: C{{KEYWORD: parameters}}: keywords upper-cased, parameters as
        sent (C{""} when none), e.g. C{{"SIZE": "35882577", "PIPELINING": ""}}.
        A later line with the same keyword wins. The old form C{AUTH=PLAIN
        LOGIN} (sent by some servers beside or instead of C{AUTH PLAIN LOGIN})
        also fills C{"AUTH"} when no C{AUTH} line is present.
    """
    extensions: Extensions = {}
    old_auth = None
    for ln in text.split("\n")[1:]:
        kw, _, arg = ln.strip().partition(" ")
        if not kw:
            continue
        kw = kw.upper()
        extensions[kw] = arg
        if kw.startswith("AUTH="):
            old_auth = f"{kw[5:]} {arg}".strip()
    if old_auth is not None and "AUTH" not in extensions:
        extensions["AUTH"] = old_auth
    return extensions


def supports_pipelining(extensions: Extensions) -> bool:
    """PIPELINING (RFC 2920) is offered."""
    return "PIPELINING" in extensions


def supports_chunking(extensions: Extensions) -> bool:
    """CHUNKING (RFC 3030 2: the BDAT command) is offered."""
    return "CHUNKING" in extensions


def supports_8bitmime(extensions: Extensions) -> bool:
    """8BITMIME (RFC 6152) is offered."""
    return "8BITMIME" in extensions


def supports_smtputf8(extensions: Extensions) -> bool:
    """SMTPUTF8 (RFC 6531) is offered."""
    return "SMTPUTF8" in extensions


def supports_starttls(extensions: Extensions) -> bool:
    """STARTTLS (RFC 3207) is offered."""
    return "STARTTLS" in extensions


def max_size(extensions: Extensions) -> int | None:
    """The server's message size limit (RFC 1870 4).

    @return: bytes; C{0} when SIZE is offered without a limit (or with an
        unreadable one); L{None} when SIZE is not offered.
    """
    if "SIZE" not in extensions:
        return None
    arg = extensions["SIZE"].strip()
    return int(arg) if arg.isdigit() else 0


def auth_mechanisms(extensions: Extensions) -> tuple[str, ...]:
    """The SASL mechanisms the server offers (RFC 4954 3), upper-cased, in
    its order; empty when it offers no AUTH."""
    return tuple(m.upper() for m in extensions.get("AUTH", "").split())


def mail_parameters(extensions: Extensions, size: int | None = None, eightbit: bool = False,
                    smtputf8: bool = False) -> str:
    """The parameters of our MAIL command, each with a leading space.

    @param size: the message size in bytes: C{SIZE=} is sent when the server
        offers SIZE (RFC 1870).
    @param eightbit: the message has 8-bit bytes: C{BODY=8BITMIME} when the
        server offers it (RFC 6152); to one that does not, the message goes as
        it is (no MIME conversion).
    @param smtputf8: the envelope needs SMTPUTF8 (RFC 6531): C{SMTPUTF8}
        (and C{BODY=8BITMIME} when offered). The caller checks first that the
        server offers SMTPUTF8 (L{supports_smtputf8}).
    @return: e.g. C{" SIZE=1234 BODY=8BITMIME"}, or C{""}.
    """
    params = ""
    if size is not None and "SIZE" in extensions:
        params += f" SIZE={size}"
    if (eightbit or smtputf8) and "8BITMIME" in extensions:
        params += " BODY=8BITMIME"
    if smtputf8:
        params += " SMTPUTF8"
    return params
