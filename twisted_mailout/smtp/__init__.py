"""The SMTP layer: the ESMTP client dialogue (RFC 5321), its reply parsing, DATA encoding,
timeouts and SASL, and the Twisted protocol that drives it over a transport.

Imports nothing above L{twisted_mailout.tls}; the delivery layer drives it.
"""
