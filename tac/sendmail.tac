# A program that sends one message with twisted_mailout.sendmail() and exits:
#
#     MAILOUT_RELAY=127.0.0.1:2525 MAILOUT_TO=bob@example.org twistd -ny tac/sendmail.tac
#
# Without MAILOUT_RELAY the message goes to the recipients' MX hosts
# (MAILOUT_RESOLVER=HOST[:PORT] to name the DNS server). Each recipient's
# outcome (status, SMTP code, reply) is logged; the exit status is 0 when all
# were delivered, 1 otherwise.
import os
import sys
from email.message import EmailMessage

from twisted.application import service
from twisted.internet import reactor
from twisted.logger import Logger

import twisted_mailout

log = Logger(namespace="sendmail.tac")


class SendOnce(service.Service):
    """Sends one message when the reactor starts, then stops the reactor."""

    def startService(self):
        super().startService()
        msg = EmailMessage()
        msg["From"] = os.environ.get("MAILOUT_FROM", "sender@example.com")
        msg["To"] = os.environ.get("MAILOUT_TO", "recipient@example.org")
        msg["Subject"] = os.environ.get("MAILOUT_SUBJECT", "Sent by tac/sendmail.tac")
        msg.set_content(os.environ.get("MAILOUT_BODY", "Hello from twisted_mailout.\n"))
        d = twisted_mailout.sendmail(
            msg["From"],
            [a.strip() for a in msg["To"].split(",")],
            msg,
            relay=os.environ.get("MAILOUT_RELAY") or None,
            resolver=os.environ.get("MAILOUT_RESOLVER") or None,
            mx_port=int(os.environ.get("MAILOUT_MX_PORT", "25")),
            tls=os.environ.get("MAILOUT_TLS", "may"),
            timeout=float(os.environ.get("MAILOUT_TIMEOUT", "60")),
        )
        d.addCallbacks(self.report, self.failed)

    def report(self, report):
        for r in report:
            log.info("to=<{rcpt}> status={status} ({code} {text}) relay={relay}",
                     rcpt=r.recipient, status=r.status, code=r.code, text=r.text,
                     relay=r.relay or "none")
        self.finish(0 if report.all_delivered else 1)

    def failed(self, f):
        log.failure("sendmail() refused its arguments", f)
        self.finish(2)

    def finish(self, code):
        # twistd exits 0 once the reactor stops; record our own status for callers.
        status_file = os.environ.get("MAILOUT_STATUS_FILE")
        if status_file:
            with open(status_file, "w") as f:
                f.write(f"{code}\n")
        if code:
            sys.stderr.write(f"sendmail.tac: not every recipient was delivered ({code})\n")
        reactor.callLater(0, reactor.stop)


application = service.Application("sendmail")
SendOnce().setServiceParent(application)
