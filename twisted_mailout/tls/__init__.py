"""The TLS layer: security levels and the per-destination policy file, certificate
verification and name checks, DANE (RFC 7672), MTA-STS (RFC 8461) and TLS-RPT (RFC 8460).

Imports L{twisted_mailout.routing} for DNS and nothing above it.
"""
