# The mailout delivery service composed in a .tac file:
#
#     MAILOUT_QUEUE=/var/spool/mailout MAILOUT_RELAY=smtp.example.com:587 twistd -ny tac/mailout.tac
#
# Edit the Config below for a deployment; every field is documented in
# twisted_mailout/daemon/config.py (they are the options of `twistd mailout --help`).
# Without MAILOUT_RELAY, mail goes to each domain's MX hosts; MAILOUT_RESOLVER
# (HOST[:PORT], comma-separated) names the only DNS servers to ask.
import os

from twisted.application import service

from twisted_mailout.daemon.config import Config
from twisted_mailout.daemon.service import makeService

config = Config(
    queue=os.environ.get("MAILOUT_QUEUE", "/var/spool/mailout"),
    relay=os.environ.get("MAILOUT_RELAY") or None,
    resolvers=tuple(r for r in os.environ.get("MAILOUT_RESOLVER", "").split(",") if r),
    mx_port=int(os.environ.get("MAILOUT_MX_PORT", "25")),
    helo=os.environ.get("MAILOUT_HELO") or None,
    tls=os.environ.get("MAILOUT_TLS", "may"),
    poll_interval=float(os.environ.get("MAILOUT_POLL_INTERVAL", "5")),
)

application = service.Application("mailout")
makeService(config).setServiceParent(application)
