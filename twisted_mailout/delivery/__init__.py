"""The delivery layer (Postfix's qmgr, scache, smtp(8) host loop and bounce): the scheduler that
decides what is due, the connector that holds connections per destination and walks next hops,
and the DSNs for what fails for good.

Imports the smtp, tls, routing and queue layers, nothing above.
"""
