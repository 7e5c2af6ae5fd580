"""twistd plugin: `twistd -n mailout --queue=DIR [options]`."""

from twisted.application.service import ServiceMaker

mailout = ServiceMaker(
    "mailout",
    "twisted_mailout.daemon.tap",
    "Deliver a mailout queue folder over ESMTP to a relay or to MX hosts.",
    "mailout",
)
