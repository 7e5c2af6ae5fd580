"""The SMTP layer: the ESMTP client dialogue (RFC 5321), its reply parsing, DATA encoding,
timeouts and SASL, and the Twisted protocol that drives it over a transport.

The pure core (no transport, no timers, no Deferreds; h11's sans-IO shape):

  - L{state<twisted_mailout.smtp.state>}: C{ClientConnection}, the client state
    machine: bytes in, events out, commands in, bytes out; the one table of
    the reply codes each command expects (C{EXPECTED});
  - L{replies<twisted_mailout.smtp.replies>}: C{ReplyParser} (bytes to replies,
    with the limits and stream offsets) and C{encode_reply};
  - L{extensions<twisted_mailout.smtp.extensions>}: C{parse_ehlo} and the
    SIZE/8BITMIME/SMTPUTF8/PIPELINING/CHUNKING/STARTTLS/AUTH helpers;
  - L{dotstuff<twisted_mailout.smtp.dotstuff>}: streaming dot-stuffing (RFC 5321 4.5.2)
    for DATA, and the line-end normaliser of BDAT chunks (RFC 3030);
  - L{sasl<twisted_mailout.smtp.sasl>}: PLAIN, LOGIN, CRAM-MD5, XOAUTH2 as step objects;
  - L{timeouts<twisted_mailout.smtp.timeouts>}: C{Timeouts} (RFC 5321 4.5.3.2);
  - L{errors<twisted_mailout.smtp.errors>}: remote and local protocol errors,
    C{Stage}, C{SessionError}.

With Twisted:

  - L{protocol<twisted_mailout.smtp.protocol>}: C{ESMTPSession}, the driver
    (transport, STARTTLS, one reply timer, Deferreds);
  - L{producers<twisted_mailout.smtp.producers>}: the message on the wire, as
    DATA (dot-stuffed) or as BDAT chunks (CHUNKING, pipelined with MAIL/RCPT);
  - L{auth<twisted_mailout.smtp.auth>}: AUTH credentials (files, environment,
    token commands) and the mechanism choice.

Imports nothing above L{twisted_mailout.tls}; the delivery layer drives it.
"""
