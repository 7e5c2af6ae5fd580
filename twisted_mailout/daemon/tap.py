"""twistd integration: C{twistd -n mailout --queue=DIR [options]}."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.python import usage

from twisted_mailout.daemon.config import Config, ConfigError
from twisted_mailout.daemon.service import DeliveryService
from twisted_mailout.daemon.service import makeService as _make
from twisted_mailout.queue import QueueError

if TYPE_CHECKING:
    from twisted_mailout.daemon.workers import WorkerSupervisor

__all__ = ["Options", "config_from_options", "makeService"]


def _seconds(v: str) -> float:
    return float(v)


class Options(usage.Options):
    """Command-line options of the mailout twistd plugin."""

    synopsis = "--queue=DIR [options]"
    longdesc = (
        "Deliver the mail in a mailout queue folder over ESMTP, to a relay (--relay) or to "
        "each recipient domain's MX hosts found through DNS. Mail is put in the queue with "
        "`mailout sendmail` or twisted_mailout.enqueue(); zope.sendmail and repoze.sendmail "
        "queue folders are drained too."
    )
    optParameters = [
        ["queue", "q", None, "Queue folder (created if missing), or a PostgreSQL queue "
         "shared by several daemons: a libpq URI, postgresql://[USER@]HOST[:PORT]/DB "
         "(docs/postgresql.md; create it with `mailout db upgrade`). Required."],
        ["queue-password-file", None, None, "PostgreSQL queue: file whose first line is the "
         "database password (else PGPASSFILE or PGPASSWORD; never in the URI)."],
        ["owner", None, None, "PostgreSQL queue: this daemon's name among those sharing the "
         "queue, unique and kept across restarts (default HOST-PID-RANDOM)."],
        ["lease-duration", None, 60.0, "PostgreSQL queue: seconds a claim on a message lasts "
         "unless renewed (every third of it); a dead daemon's messages go to the others "
         "after this.", _seconds],
        ["relay", None, None, "Send all mail to this smarthost instead of to MX hosts: "
         "HOST[:PORT] (port 25, STARTTLS), smtp://HOST[:PORT] (port 587, STARTTLS) or "
         "smtps://HOST[:PORT] (port 465, implicit TLS, RFC 8314)."],
        ["mx-port", None, 25, "TCP port used for MX hosts.", int],
        ["helo", None, None, "Name given in EHLO/HELO (default: this host's name)."],
        ["tls", None, "may", "Default TLS level: none; may (STARTTLS when offered, any "
         "certificate; plaintext retry if the handshake fails); encrypt (TLS required, "
         "certificate not checked); verify (TLS required, chain and MX/relay host name "
         "checked); secure (as verify, but the certificate must match the recipient domain "
         "or a policy match= name); dane / dane-only (RFC 7672, needs --dnssec-resolver). "
         "See docs/security.md."],
        ["tls-policy", None, None, "Policy file of per-destination TLS levels, one "
         "'DESTINATION LEVEL [match=NAME:NAME]' per line (docs/security.md)."],
        ["cafile", None, None, "PEM file of trusted CA certificates for verify, secure and "
         "MTA-STS (default: the system's store)."],
        ["tls-fallback-memory", None, 3600.0, "Seconds a host whose TLS handshake failed "
         "under 'may' is sent plaintext without trying TLS again (0: never fall back).",
         _seconds],
        ["auth-user", None, None, "SMTP AUTH user name for the relay (with one of the "
         "--auth-password-file, --auth-password-env, --auth-token-* options)."],
        ["auth-password-file", None, None, "File whose first line is the AUTH password "
         "(keep it mode 0600). Passwords are never taken from the command line."],
        ["auth-password-env", None, None, "Environment variable holding the AUTH password."],
        ["auth-token-file", None, None, "File holding an OAuth 2.0 access token for XOAUTH2, "
         "read again for each connection."],
        ["auth-token-command", None, None, "Command printing an OAuth 2.0 access token for "
         "XOAUTH2 on its standard output, run for each connection (no shell)."],
        ["auth-mechanisms", None, None, "AUTH mechanisms allowed, comma-separated, in order "
         "of preference (default: PLAIN, LOGIN, CRAM-MD5; XOAUTH2 with a token)."],
        ["max-connections", None, 20, "Open SMTP connections at most.", int],
        ["max-per-destination", None, 4, "Open connections to one destination at most.", int],
        ["poll-interval", None, 5.0, "Seconds between scans of new/ (inotify picks up at "
         "once where available).", _seconds],
        ["retry-base", None, 300.0, "Seconds before the first retry of deferred mail; "
         "doubles with each attempt.", _seconds],
        ["retry-max", None, 4000.0, "Longest wait between retries, seconds.", _seconds],
        ["max-queue-lifetime", None, 5 * 86400.0, "Seconds after which deferred mail is "
         "bounced (default 5 days).", _seconds],
        ["bounce-lifetime", None, 5 * 86400.0, "Seconds after which an undeliverable bounce "
         "is dropped (default 5 days).", _seconds],
        ["connection-idle", None, 2.0, "Seconds an idle connection is kept for reuse.",
         _seconds],
        ["connection-max-age", None, 300.0, "Seconds after which a connection is not "
         "reused.", _seconds],
        ["max-messages-per-connection", None, 100, "Transactions per connection at most.",
         int],
        ["command-timeout", None, None, "Cap in seconds on every SMTP command timeout "
         "(default: RFC 5321 4.5.3.2 values, 2 to 10 minutes).", _seconds],
        ["connect-timeout", None, 30.0, "TCP connect timeout, seconds.", _seconds],
        ["dns-timeout", None, 15.0, "Seconds a DNS query may take in all.", _seconds],
        ["shutdown-timeout", None, 30.0, "Seconds a graceful stop (SIGTERM) waits for "
         "transactions in flight.", _seconds],
        ["retry-jitter", None, 0.1, "Fraction (0 to 1) by which each retry delay is "
         "shortened at random, so retries spread out.", float],
        ["destination-failure-memory", None, 60.0, "Seconds a destination whose every host "
         "failed is not tried again; its mail is deferred at once (at most --retry-base).",
         _seconds],
        ["dkim-keys", None, None, "DKIM key table (TOML; docs/deliverability.md): mail is "
         "signed with the keys of its From domain (rsa-sha256 and/or ed25519-sha256) once, "
         "before its first attempt."],
        ["shaping", None, None, "Traffic shaping file (TOML; docs/deliverability.md): "
         "connection limits, message and connection rates, deliveries per connection and "
         "more, per destination and per provider (matched by MX host names), with presets "
         "for Google, Yahoo, Microsoft and Apple, and throttling rules that suspend or slow "
         "a destination on its throttling replies."],
        ["log-format", None, "text", "text: the Postfix-style log only (default); json: also one "
         "JSON record a line per recipient outcome and operator action, to --json-log "
         "(docs/operations.md)."],
        ["json-log", None, None, "File of the JSON records (created mode 0600, rotated at 100 MB, "
         "10 kept; '-' for standard output). Implies --log-format json; the default with "
         "--log-format json is mailout.json in the working folder, beside twistd.log."],
        ["delay-warning", None, None, "Seconds after arrival when the sender of mail still "
         "deferred gets one delay warning (RFC 3464 'delayed'); off by default.", _seconds],
        ["workers", None, "1", "Delivery processes sharing the queue folder: a number, or "
         "'auto' for one per core this process may use, at most --max-workers. With more "
         "than one, this process supervises them (restarts one that dies, stops them all on "
         "SIGTERM, gathers their logs and metrics, serves the API for all); each message "
         "belongs to one worker, and the connection limits hold across them "
         "(docs/design.md, 'Workers')."],
        ["max-workers", None, 8, "The most workers --workers auto starts.", int],
        ["http-token-file", None, None, "File whose first line is the bearer token of the "
         "HTTP API (mode 0600; refused when every user may read it). With it, every /api/ "
         "request not made through a Unix socket needs 'Authorization: Bearer TOKEN', and "
         "--http may listen beyond loopback (docs/operations.md)."],
    ]

    optFlags = [
        ["auth-plaintext", None, "Allow AUTH over a connection that is not encrypted "
         "(off: credentials are only sent under TLS)."],
        ["dkim-required", None, "With --dkim-keys: defer mail that cannot be signed (no key "
         "for its From domain) instead of sending it unsigned."],
        ["mta-sts", None, "Apply MTA-STS policies (RFC 8461) of recipient domains: fetch, "
         "cache under the queue folder, enforce."],
        ["no-chunking", None, "Send DATA even to servers that offer CHUNKING (by default "
         "such a server gets BDAT, RFC 3030: no dot-stuffing, no 354 round trip)."],
        ["no-http", None, "Do not serve the HTTP API on the default Unix socket, "
         "QUEUE/control.sock (--http endpoints are still served)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["resolvers"] = []
        self["source-addresses"] = []
        self["dnssec-resolvers"] = []
        self["http"] = []

    def opt_http(self, value: str) -> None:
        """Also serve the HTTP API (/api/v1, /healthz, /readyz, /metrics, the status
        page) on this Twisted server endpoint (repeatable), e.g.
        tcp:8025:interface=127.0.0.1 or unix:/run/mailout/api.sock:mode=600. A TCP
        endpoint must listen on loopback unless --http-token-file is given. The
        default Unix socket QUEUE/control.sock (mode 0600) is served as well unless
        --no-http."""
        self["http"].append(value)

    def opt_dnssec_resolver(self, value: str) -> None:
        """Validating DNS resolver, HOST[:PORT] (IPv4; repeatable), trusted to set the AD
        bit: enables DANE (RFC 7672) for destinations at the may, dane and dane-only
        levels."""
        self["dnssec-resolvers"].append(value)

    def opt_source_address(self, value: str) -> None:
        """Local address outgoing SMTP connections are made from (IPv4 or IPv6;
        repeatable: at most one of each family). Default: the system's choice."""
        self["source-addresses"].append(value)

    def opt_resolver(self, value: str) -> None:
        """DNS server to ask, HOST[:PORT] (IPv4; repeatable). When given, no other
        resolver is asked (not resolv.conf, not getaddrinfo). Default: resolv.conf."""
        self["resolvers"].append(value)

    def postOptions(self) -> None:
        """Build the L{Config} into C{self["config"]}.

        @raise usage.UsageError: a missing or invalid value.
        """
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format is text or json")
        if self["json-log"] is not None:
            self["log-format"] = "json"
        elif self["log-format"] == "json":
            self["json-log"] = "mailout.json"
        if self["workers"] == "auto":
            from twisted_mailout.daemon.workers import default_workers

            if self["max-workers"] < 1:
                raise usage.UsageError("--max-workers must be at least 1")
            self["workers"] = default_workers(self["max-workers"])
        else:
            try:
                self["workers"] = int(self["workers"])
            except ValueError:
                raise usage.UsageError(f"--workers is a number or auto, not "
                                       f"{self['workers']!r}") from None
        try:
            self["config"] = config_from_options(self)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def config_from_options(o: Options) -> Config:
    """Build the L{Config} from parsed L{Options}.

    @param o: the parsed options (a C{dict} of option name to value).
    @return: the daemon's configuration.

    @raise ConfigError: a missing or invalid value.
    """
    if not o["queue"]:
        raise ConfigError("--queue=DIR is required")
    return Config(
        queue=o["queue"],
        relay=o["relay"],
        resolvers=tuple(o["resolvers"]),
        mx_port=o["mx-port"],
        helo=o["helo"],
        tls=o["tls"],
        cafile=o["cafile"],
        max_connections=o["max-connections"],
        max_per_destination=o["max-per-destination"],
        poll_interval=o["poll-interval"],
        retry_base=o["retry-base"],
        retry_max=o["retry-max"],
        max_queue_lifetime=o["max-queue-lifetime"],
        bounce_lifetime=o["bounce-lifetime"],
        connection_idle=o["connection-idle"],
        connection_max_age=o["connection-max-age"],
        max_messages_per_connection=o["max-messages-per-connection"],
        command_timeout=o["command-timeout"],
        connect_timeout=o["connect-timeout"],
        dns_timeout=o["dns-timeout"],
        shutdown_timeout=o["shutdown-timeout"],
        delay_warning=o["delay-warning"],
        retry_jitter=o["retry-jitter"],
        destination_failure_memory=o["destination-failure-memory"],
        tls_policy=o["tls-policy"],
        tls_fallback_memory=o["tls-fallback-memory"],
        auth_user=o["auth-user"],
        auth_password_file=o["auth-password-file"],
        auth_password_env=o["auth-password-env"],
        auth_token_file=o["auth-token-file"],
        auth_token_command=o["auth-token-command"],
        auth_mechanisms=o["auth-mechanisms"],
        auth_plaintext=bool(o["auth-plaintext"]),
        mta_sts=bool(o["mta-sts"]),
        dnssec_resolvers=tuple(o["dnssec-resolvers"]),
        source_addresses=tuple(o.get("source-addresses", ())),
        dkim_keys=o.get("dkim-keys"),
        dkim_required=bool(o.get("dkim-required")),
        shaping=o.get("shaping"),
        queue_password_file=o.get("queue-password-file"),
        owner=o.get("owner"),
        lease_duration=o.get("lease-duration", 60.0),
        http=tuple(o["http"]),
        http_default=not o["no-http"],
        http_token_file=o["http-token-file"],
        workers=int(o.get("workers", 1)),
        chunking=not o.get("no-chunking"),
    )


def makeService(options: Options) -> DeliveryService | WorkerSupervisor:
    """twistd's entry point: the L{DeliveryService} for C{options}.

    @param options: the parsed L{Options} (their C{"config"} is the L{Config}).
    @return: the service, not started.
    @raise SystemExit: with a clear message when another daemon holds the
        queue's lock, the folder cannot be used, or a file named by an
        option (cafile, policy file, password file, token file) cannot be
        used.
    """
    try:
        config = options["config"]
        if config.workers > 1:
            from twisted_mailout.daemon.workers import WorkerSupervisor

            service: DeliveryService | WorkerSupervisor = WorkerSupervisor(config)
        else:
            service = _make(config)
    except QueueError as e:
        raise SystemExit(f"mailout: {e}") from None
    except (OSError, ValueError) as e:  # e.g. an unreadable or empty --cafile
        raise SystemExit(f"mailout: cannot start: {e}") from None
    if options.get("log-format") == "json":
        # For the life of the process (not a child service): outcomes that
        # finish during the shutdown's wait are still written.
        from twisted_mailout.daemon import jsonlog

        try:
            jsonlog.install(options["json-log"])
        except OSError as e:
            service.queue.unlock()
            raise SystemExit(f"mailout: cannot open the JSON log {options['json-log']}: "
                             f"{e.strerror or e}") from None
    return service
