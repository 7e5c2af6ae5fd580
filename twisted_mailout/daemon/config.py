"""The one typed configuration object, built from the command line or a .tac file."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from twisted_mailout.errors import ConfigError  # one hierarchy (still a ValueError)
from twisted_mailout.routing.router import parse_hostport, parse_relay
from twisted_mailout.smtp.auth import AuthError, Credentials, credentials_from_options
from twisted_mailout.smtp.timeouts import Timeouts
from twisted_mailout.tls.policy import PolicyFileError, PolicyTable, TLSPolicy
from twisted_mailout.tls.levels import LEVELS as TLS_LEVELS

__all__ = ["Config", "ConfigError", "http_endpoint_is_local", "read_token_file"]


#: The most worker processes C{--workers} starts (the shared connection
#: table has a column for each).
MAX_WORKERS = 64


@dataclass(frozen=True)
class Config:
    """Everything the delivery service needs.

    @ivar queue: the queue folder.
    @ivar relay: a smarthost: C{"HOST[:PORT]"} (port 25, STARTTLS),
        C{"smtp://HOST[:PORT]"} (port 587, STARTTLS) or C{"smtps://HOST[:PORT]"}
        (port 465, implicit TLS, RFC 8314); L{None} to deliver to each
        domain's MX hosts.
    @ivar resolvers: C{["HOST[:PORT]", ...]} DNS servers (IPv4); empty for
        the system's resolv.conf. When given, they are the only ones asked.
    @ivar mx_port: TCP port used for MX hosts.
    @ivar helo: EHLO name; this host's name when L{None}.
    @ivar tls: the default TLS level (L{tlspolicy.LEVELS}: C{none}, C{may},
        C{encrypt}, C{verify}, C{secure}, C{dane}, C{dane-only}).
    @ivar tls_policy: a policy file of per-destination levels (see
        L{tlspolicy.PolicyTable}), or L{None}.
    @ivar cafile: PEM file of trusted CAs for C{verify}/C{secure} and
        MTA-STS; the system store when L{None}.
    @ivar tls_fallback_memory: seconds a host whose TLS handshake failed
        under C{may} is sent plaintext without trying TLS again.
    @ivar auth_user: SMTP AUTH user name for the relay, or L{None}.
    @ivar auth_password_file: file holding the AUTH password.
    @ivar auth_password_env: environment variable holding it.
    @ivar auth_token_file: file holding an XOAUTH2 token (read per connection).
    @ivar auth_token_command: command printing an XOAUTH2 token.
    @ivar auth_mechanisms: allowed mechanisms, comma-separated, or L{None}.
    @ivar auth_plaintext: allow AUTH over a connection without TLS.
    @ivar mta_sts: apply MTA-STS (RFC 8461) policies to MX delivery.
    @ivar dnssec_resolvers: C{["HOST[:PORT]", ...]} validating resolvers:
        when given, DANE (RFC 7672) applies to C{may}/C{dane} destinations.
    @ivar source_addresses: local addresses outgoing SMTP connections are
        made from (C{--source-address}), at most one IPv4 and one IPv6.
    @ivar queue_password_file: with a PostgreSQL queue, the file whose
        first line is the database password (else libpq's C{PGPASSFILE} or
        C{PGPASSWORD}); never in the URI given on the command line.
    @ivar owner: with a PostgreSQL queue, this daemon's lease owner name
        (unique among the daemons sharing the queue, and the same across
        its restarts, so a restarted daemon takes its own leases back at
        once); L{None}: C{HOST-PID-RANDOM} (a restart then waits for its old
        leases to expire).
    @ivar lease_duration: with a PostgreSQL queue, seconds a claim lasts
        unless renewed (renewed every third of it).
    @ivar shaping: the traffic shaping file (C{--shaping}, TOML), or L{None}
        for no shaping (nor throttling rules).
    @ivar dkim_keys: the DKIM key table file (C{--dkim-keys}), or L{None}
        for no signing.
    @ivar dkim_required: defer mail whose From domain has no key, rather
        than send it unsigned.
    @ivar max_connections: open SMTP connections at most.
    @ivar max_per_destination: open connections to one destination at most.
    @ivar poll_interval: seconds between scans of C{new/} (inotify makes
        pickup immediate where available).
    @ivar retry_base: seconds before the first retry of deferred mail.
    @ivar retry_max: longest wait between retries, seconds.
    @ivar max_queue_lifetime: seconds after which deferred mail bounces.
    @ivar bounce_lifetime: the same for bounces, which are then dropped.
    @ivar connection_idle: seconds an idle connection is kept for reuse.
    @ivar connection_max_age: seconds after which a connection is not reused.
    @ivar max_messages_per_connection: transactions per connection at most.
    @ivar command_timeout: cap in seconds on every per-command timeout
        (L{None}: the RFC 5321 4.5.3.2 values).
    @ivar connect_timeout: TCP connect timeout, seconds.
    @ivar dns_timeout: seconds a DNS query may take in all.
    @ivar shutdown_timeout: seconds a graceful stop waits for transactions.
    @ivar retry_jitter: fraction (0 to 1) by which each retry delay is
        shortened at random, so retries of many messages spread out.
    @ivar destination_failure_memory: seconds a destination whose every host
        failed is not tried again (its mail is deferred at once); at most
        C{retry_base}.
    @ivar delay_warning: seconds after arrival when the sender of mail still
        deferred is warned once (RFC 3464 action C{delayed}); L{None}: never.
    @ivar http: Twisted server endpoint strings the HTTP API is served on
        (C{--http}, repeatable), besides the default Unix socket. A TCP (or
        SSL) endpoint must name a loopback C{interface=} unless
        C{http_token_file} is given (docs/operations.md).
    @ivar http_default: serve the API on the default Unix socket,
        C{DIR/control.sock}, mode 0600 (C{--no-http} turns it off).
    @ivar http_token_file: a file whose first line is the API's bearer token
        (C{--http-token-file}); it must not be readable by every user.
    @ivar workers: delivery processes sharing the queue folder (C{--workers};
        1: this process delivers; more: it supervises that many workers,
        L{twisted_mailout.daemon.workers}).
    @ivar chunking: send BDAT (RFC 3030) to servers offering CHUNKING
        (C{--no-chunking}: always DATA).
    @ivar worker_index: in a worker process, its index (from 0); L{None}
        elsewhere.
    @ivar worker_count: in a worker process, how many workers share the folder.
    """

    queue: str
    relay: str | None = None
    resolvers: tuple[str, ...] = ()
    mx_port: int = 25
    helo: str | None = None
    tls: str = "may"
    cafile: str | None = None
    max_connections: int = 20
    max_per_destination: int = 4
    poll_interval: float = 5.0
    retry_base: float = 300.0
    retry_max: float = 4000.0
    max_queue_lifetime: float = 5 * 86400.0
    bounce_lifetime: float = 5 * 86400.0
    connection_idle: float = 2.0
    connection_max_age: float = 300.0
    max_messages_per_connection: int = 100
    command_timeout: float | None = None
    connect_timeout: float = 30.0
    dns_timeout: float = 15.0
    shutdown_timeout: float = 30.0
    delay_warning: float | None = None
    retry_jitter: float = 0.1
    destination_failure_memory: float = 60.0
    tls_policy: str | None = None
    tls_fallback_memory: float = 3600.0
    auth_user: str | None = None
    auth_password_file: str | None = None
    auth_password_env: str | None = None
    auth_token_file: str | None = None
    auth_token_command: str | None = None
    auth_mechanisms: str | None = None
    auth_plaintext: bool = False
    mta_sts: bool = False
    dnssec_resolvers: tuple[str, ...] = ()
    http: tuple[str, ...] = ()
    source_addresses: tuple[str, ...] = ()
    dkim_keys: str | None = None
    dkim_required: bool = False
    shaping: str | None = None
    queue_password_file: str | None = None
    owner: str | None = None
    lease_duration: float = 60.0
    http_default: bool = True
    http_token_file: str | None = None
    workers: int = 1
    chunking: bool = True
    worker_index: int | None = None
    worker_count: int = 1

    def __post_init__(self) -> None:
        if not self.queue:
            raise ConfigError("--queue is required")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"--workers must be 1 to {MAX_WORKERS}, not {self.workers}")
        if self.workers > 1 and self.shared_queue:
            raise ConfigError("--workers applies to a queue folder; with a PostgreSQL queue "
                              "run more daemons instead (each is a consumer of the shared "
                              "queue, see docs/postgresql.md)")
        if self.worker_index is not None and not 0 <= self.worker_index < self.worker_count:
            raise ConfigError(f"worker {self.worker_index} of {self.worker_count}: out of range")
        if self.shared_queue:
            if not self.lease_duration >= 3:
                raise ConfigError("--lease-duration must be at least 3 seconds")
            if self.queue_password_file is not None:
                self.queue_password()
        elif self.queue_password_file is not None or self.owner is not None:
            raise ConfigError("--queue-password-file and --owner apply to a PostgreSQL "
                              "queue (--queue postgresql://...) only")
        if self.tls not in TLS_LEVELS:
            raise ConfigError(f"--tls must be one of {', '.join(TLS_LEVELS)}, not {self.tls!r}")
        if self.relay is not None:
            try:
                parse_relay(self.relay)
            except ValueError as e:
                raise ConfigError(f"--relay: {e}") from None
        for opt, servers in (("--resolver", self.resolvers),
                             ("--dnssec-resolver", self.dnssec_resolvers)):
            for r in servers:
                try:
                    host, _ = parse_hostport(r, 53)
                    socket.inet_aton(host)
                except (ValueError, OSError):
                    raise ConfigError(f"{opt} {r!r}: expected an IPv4 address[:port]") from None
        if self.tls_policy is not None:
            try:
                PolicyTable.from_file(self.tls_policy)
            except PolicyFileError as e:
                raise ConfigError(f"--tls-policy: {e}") from None
        try:
            creds = self.credentials()
        except AuthError as e:
            raise ConfigError(str(e)) from None
        if creds is not None and self.relay is None:
            raise ConfigError("--auth-user is for a relay: give --relay too")
        if self.tls_fallback_memory < 0:
            raise ConfigError("--tls-fallback-memory must not be negative")
        if not 0 < self.mx_port < 65536:
            raise ConfigError("--mx-port must be 1..65535")
        for name in ("max_connections", "max_per_destination", "max_messages_per_connection"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("poll_interval", "retry_base", "retry_max", "max_queue_lifetime",
                     "bounce_lifetime", "connect_timeout", "dns_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if not 0 <= self.retry_jitter <= 1:
            raise ConfigError("--retry-jitter must be between 0 and 1")
        if self.destination_failure_memory < 0:
            raise ConfigError("--destination-failure-memory must not be negative")
        if self.delay_warning is not None and self.delay_warning <= 0:
            raise ConfigError("--delay-warning must be positive")
        if self.retry_max < self.retry_base:
            raise ConfigError("--retry-max must not be less than --retry-base")
        families = []
        for addr in self.source_addresses:
            try:
                families.append(ipaddress.ip_address(addr).version)
            except ValueError:
                raise ConfigError(f"--source-address {addr!r}: expected an IPv4 or IPv6 "
                                  "address") from None
        if len(families) != len(set(families)):
            raise ConfigError("--source-address: give at most one IPv4 and one IPv6 address")
        if self.dkim_required and self.dkim_keys is None:
            raise ConfigError("--dkim-required needs --dkim-keys FILE")
        self.shaping_config()
        if self.http_token_file is not None:
            read_token_file(self.http_token_file)
        for desc in self.http:
            if not http_endpoint_is_local(desc) and self.http_token_file is None:
                raise ConfigError(
                    f"--http {desc!r} may be reached from other hosts: listen on loopback "
                    "(for example tcp:8025:interface=127.0.0.1) or give --http-token-file")

    @property
    def shared_queue(self) -> bool:
        """Whether C{queue} names a PostgreSQL store (a libpq URI), which
        several daemons may share, rather than a folder."""
        return self.queue.startswith(("postgresql://", "postgres://"))

    def queue_password(self) -> str | None:
        """The database password from C{queue_password_file}, or L{None}.

        @raise ConfigError: the file cannot be read or its first line is empty.
        """
        if self.queue_password_file is None:
            return None
        from twisted_mailout.daemon.dbcli import read_password_file

        try:
            return read_password_file(self.queue_password_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--queue-password-file: {e}") from None

    def shaping_config(self) -> Any:
        """The loaded shaping file (a
        L{ShapingConfig<twisted_mailout.delivery.shaping.ShapingConfig>},
        presets included unless it says C{presets = false}), or L{None}
        without C{--shaping}.

        @raise ConfigError: the file cannot be read or has a mistake (the
            file, section and setting are named).
        """
        if self.shaping is None:
            return None
        from twisted_mailout.delivery.shaping import ShapingConfig, ShapingError

        try:
            return ShapingConfig.load(self.shaping)
        except ShapingError as e:
            raise ConfigError(f"--shaping: {e}") from None

    def signer(self) -> Any:
        """The DKIM L{Signer<twisted_mailout.dkim.Signer>} of C{dkim_keys}
        (keys read now), or L{None} without a key table.

        @raise ConfigError: the table or a key cannot be used (which line,
            what is wrong).
        """
        if self.dkim_keys is None:
            return None
        from twisted_mailout.dkim import KeyTable, Signer

        return Signer(KeyTable.load(self.dkim_keys), required=self.dkim_required)

    def credentials(self) -> Credentials | None:
        """The relay's AUTH L{Credentials}, read from the file or the
        environment now, or L{None} without C{auth_user}.

        @raise AuthError: incomplete options, an unreadable file.
        """
        return credentials_from_options(
            self.auth_user, self.auth_password_file, self.auth_password_env,
            self.auth_token_file, self.auth_token_command, self.auth_mechanisms,
            self.auth_plaintext)

    def policy_table(self) -> PolicyTable:
        """The L{PolicyTable}: the file's entries over C{tls}.

        @raise PolicyFileError: the file cannot be used.
        """
        default = TLSPolicy(self.tls, (), "--tls")
        if self.tls_policy is None:
            return PolicyTable(default)
        return PolicyTable.from_file(self.tls_policy, default)

    @property
    def helo_name(self) -> str:
        """The EHLO name: C{helo}, else this host's name (set --helo to a
        fully qualified name when the host name is not one)."""
        return self.helo or _fqdn()

    @property
    def timeouts(self) -> Timeouts:
        """Per-command L{Timeouts}, capped by C{command_timeout}."""
        t = Timeouts.scaled(self.command_timeout) if self.command_timeout else Timeouts()
        from dataclasses import replace

        return replace(t, connect=self.connect_timeout)

    @property
    def dns_tries(self) -> tuple[float, ...]:
        """Per-try DNS timeouts adding up to C{dns_timeout}."""
        t = self.dns_timeout
        return (t / 7, 2 * t / 7, 4 * t / 7)


def read_token_file(path: str) -> str:
    """The HTTP API's bearer token: the first line of C{path}, stripped.

    @param path: the C{--http-token-file}.
    @return: the token (not empty).
    @raise ConfigError: the file is missing, unreadable, readable by every
        user (its mode grants "other" read), or its first line is empty.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"--http-token-file {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"--http-token-file {path}: not a regular file")
    if st.st_mode & stat.S_IROTH:
        raise ConfigError(f"--http-token-file {path} is readable by every user (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 it")
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--http-token-file {path}: cannot read it: {e}") from None
    token = line.strip()
    if not token:
        raise ConfigError(f"--http-token-file {path}: its first line is empty")
    return token


def http_endpoint_is_local(description: str) -> bool:
    """Can only this host reach an HTTP endpoint? (Without a token, the API
    may listen only where the answer is yes.)

    @param description: a Twisted server endpoint string (C{--http}).
    @return: C{True} for a Unix socket, and for a C{tcp}, C{tcp6} or C{ssl}
        endpoint whose C{interface=} is a loopback address; C{False} for one
        on every interface, another address, or any other kind of endpoint
        (whose reach cannot be told).
    @raise ConfigError: the string is not a usable server endpoint.
    """
    from twisted.internet import endpoints

    try:
        # The parsers only keep the reactor; the real one is given at listen
        # time (importing it here would install it before twistd chose one).
        ep = endpoints.serverFromString(object(), description)
    except Exception as e:  # noqa: BLE001 - plugin parsers raise anything
        raise ConfigError(f"--http {description!r}: not a server endpoint: {e}") from None
    if isinstance(ep, endpoints.UNIXServerEndpoint):
        return True
    if isinstance(ep, endpoints.TCP4ServerEndpoint | endpoints.TCP6ServerEndpoint
                  | endpoints.SSL4ServerEndpoint):
        interface = getattr(ep, "_interface", "")
        try:
            return bool(interface) and ipaddress.ip_address(interface).is_loopback
        except ValueError:
            return False
    return False


_FQDN = None


def _fqdn() -> str:
    global _FQDN
    if _FQDN is None:
        # gethostname() only: getfqdn() would ask DNS behind --resolver's back.
        _FQDN = socket.gethostname() or "localhost"
    return _FQDN
