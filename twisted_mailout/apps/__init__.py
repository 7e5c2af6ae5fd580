"""The applications layer (docs/applications.md): deliveries chosen by URL, the L{Mailer} and its
outcome events, send on commit with the C{transaction} package, the message builder and the
Django e-mail backend.

Reaches the delivery core only through L{twisted_mailout.api} and the queue layer.
"""
