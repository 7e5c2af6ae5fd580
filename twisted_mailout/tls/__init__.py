"""The TLS layer: security levels and the per-destination policy file, certificate
verification and name checks, DANE (RFC 7672), MTA-STS (RFC 8461) and TLS-RPT (RFC 8460).

  - L{levels<twisted_mailout.tls.levels>}: the one list of TLS levels;
  - L{policy<twisted_mailout.tls.policy>}: C{TLSPolicy} and the policy file;
  - L{creators<twisted_mailout.tls.creators>}: the one TLS context builder and
    connection creator (C{ClientTLS}), the trust root;
  - L{names<twisted_mailout.tls.names>}: the one certificate-name check;
  - L{errors<twisted_mailout.tls.errors>}: the one verify-error table and the
    certificate error types;
  - L{dane<twisted_mailout.tls.dane>}, L{mtasts<twisted_mailout.tls.mtasts>},
    L{tlsrpt<twisted_mailout.tls.tlsrpt>}: the three RFCs above;
  - L{resolve<twisted_mailout.tls.resolve>}: the per-host security decision.

Imports L{twisted_mailout.routing} for DNS and nothing above it.
"""
