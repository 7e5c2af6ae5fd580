"""A real DNSSEC-validating resolver on loopback, for the DANE tests.

:class:`DNSSECHarness` builds DNS zones from :class:`Zone` descriptions, signs
the secure ones with Debian's ``ldnsutils`` (``ldns-keygen``, ``ldns-signzone``),
serves each zone authoritatively from its own private Unbound instance
(``auth-zone``; one instance per zone, so a parent always answers the DS
queries for its children's delegations), and runs one more Unbound as a
*validating* recursive resolver with:

* the DS of the topmost signed zone as its only trust anchor,
* ``stub-zone`` entries sending every zone (and ``.``) to those authorities,
  so nothing ever leaves loopback (the root stub answers REFUSED for any
  other name, which the resolver reports as SERVFAIL),
* ``do-not-query-localhost: no`` (the authorities live on 127.0.0.1).

Delegations are automatic: for a zone whose parent is also in the harness,
NS and glue (``127.0.0.1``) records go into the parent, and a DS record too
when the child is signed. An unsigned child of a signed parent is thereby a
provably *insecure* delegation (the parent's NSEC denies the DS), so answers
from it come back without the AD bit. Names listed in ``Zone.corrupt`` get a
damaged RRSIG after signing: the resolver finds them *bogus* and answers
SERVFAIL.

Everything lives in one work directory; ports come from :func:`peers.free_port`
(retried when a bind race loses); every wait is bounded; :meth:`DNSSECHarness.stop`
kills the processes (SIGTERM, SIGKILL after 10 s). The system's unbound
service and ``/etc/unbound`` are never used.

Typical run time: about one second to generate keys, sign, start four Unbound
processes and see the first validated answer (keys are ECDSA P-256: key
generation and signing take milliseconds; the rest is Unbound start-up and
readiness polling). ``setup_seconds`` records it.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.peers import IN_CI, _stop_process, free_port
from tests.support.wait import wait_for

UNBOUND = "/usr/sbin/unbound"
LDNS_KEYGEN = "/usr/bin/ldns-keygen"
LDNS_SIGNZONE = "/usr/bin/ldns-signzone"

#: Debian packages providing the tools above.
PACKAGES = {UNBOUND: "unbound", LDNS_KEYGEN: "ldnsutils", LDNS_SIGNZONE: "ldnsutils"}

ALGORITHM = "ECDSAP256SHA256"  # DNSSEC algorithm 13: fast keys, small signatures
LOOPBACK = "127.0.0.1"


def missing_tools() -> list[str]:
    """The tool paths needed by the harness that are not installed.

    :return: list of str, empty when everything is there.
    """
    return [path for path in PACKAGES if not os.access(path, os.X_OK)]


def require_tools() -> None:
    """Skip the calling test when a tool is missing; fail instead under CI.

    :raises pytest.skip.Exception: tools missing and not in CI.
    :raises pytest.fail.Exception: tools missing and env ``CI=true``.
    """
    import pytest

    missing = missing_tools()
    if not missing:
        return
    pkgs = " ".join(sorted({PACKAGES[m] for m in missing}))
    text = f"{', '.join(missing)} missing (apt-get install {pkgs})"
    if IN_CI:
        pytest.fail(f"{text} but CI=true")
    pytest.skip(text)


@dataclass
class Zone:
    """One DNS zone for the harness.

    :ivar origin: the zone's name, e.g. ``"example.test"`` (trailing dot optional).
    :ivar records: zone-file lines (master file format, RFC 1035 §5), owner
        names relative to the origin or absolute; the SOA, the apex NS and
        ``ns.<origin> A 127.0.0.1`` are added, and so are delegations to the
        harness's other zones.
    :ivar signed: sign the zone (ECDSA P-256, one key with the SEP flag used
        as a combined signing key; NSEC).
    :ivar corrupt: ``(owner, rrtype)`` pairs (absolute names, types such as
        ``"TLSA"``) whose RRSIG gets a damaged signature after signing, making
        that RRset bogus to a validating resolver.
    :ivar ttl: default TTL in seconds.
    """

    origin: str
    records: list[str] = field(default_factory=list)
    signed: bool = True
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    ttl: int = 300

    def __post_init__(self) -> None:
        self.origin = self.origin.rstrip(".").lower() + "."


class HarnessError(RuntimeError):
    """A tool failed or a server did not come up; the message includes its output/log."""


def _parent_zone(origin: str, origins: Iterable[str]) -> str | None:
    """The closest enclosing zone of ``origin`` among ``origins`` (absolute names), or None."""
    best = None
    for other in origins:
        if other != origin and (other == "." or origin.endswith("." + other)):
            if best is None or len(other) > len(best):
                best = other
    return best


def _run(cmd: list[str], cwd: Path, timeout: float = 30.0) -> str:
    """Run a tool; return its stdout. :raises HarnessError: non-zero exit or timeout."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{cmd[0]} took more than {timeout} s") from exc
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


def _corrupt_rrsig(text: str, owner: str, rrtype: str) -> tuple[str, int]:
    """Flip one bit in the signatures of RRSIGs covering ``owner``/``rrtype``.

    :param text: a signed zone file as printed by ldns-signzone (one RR a line).
    :return: ``(new text, number of RRSIGs damaged)``.
    """
    owner = owner.rstrip(".").lower() + "."
    out = []
    count = 0
    for line in text.splitlines():
        fields = line.split()
        # owner ttl class RRSIG covered alg labels origttl exp inc tag signer sig...
        if (
            len(fields) >= 13
            and fields[0].lower() == owner
            and fields[3] == "RRSIG"
            and fields[4].upper() == rrtype.upper()
        ):
            sig = bytearray(base64.b64decode("".join(fields[12:])))
            sig[len(sig) // 2] ^= 0x01
            fields = [*fields[:12], base64.b64encode(bytes(sig)).decode()]
            line = "\t".join(fields)
            count += 1
        out.append(line)
    return "\n".join(out) + "\n", count


def _dns_query(port: int, name: str, rrtype: int, timeout: float = 1.0) -> tuple[int, bool, int]:
    """One blocking UDP query (RD and AD set) to 127.0.0.1:port, for readiness checks.

    :return: ``(rcode, ad_bit, number_of_answers)``.
    :raises OSError: no answer within ``timeout`` seconds (socket.timeout).
    """
    from twisted.names import dns

    msg = dns.Message(id=int.from_bytes(os.urandom(2), "big"), recDes=1, authenticData=1)
    msg.queries = [dns.Query(name, rrtype, dns.IN)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(msg.toStr(), (LOOPBACK, port))
        while True:
            data, _ = sock.recvfrom(65535)
            reply = dns.Message()
            reply.fromStr(data)
            if reply.id == msg.id:
                return reply.rCode, bool(reply.authenticData), len(reply.answers)


class _Unbound:
    """One private Unbound process (config, log and port in ``workdir``)."""

    def __init__(
        self, label: str, workdir: Path, config_body: str, nodefault: Iterable[str] = ()
    ) -> None:
        self.label = label
        self.workdir = workdir
        self.config_body = config_body  # the parts after the common "server:" lines
        self.nodefault = "".join(f'    local-zone: "{n}" nodefault\n' for n in nodefault)
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.label}.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _config(self, port: int) -> str:
        return f"""server:
    verbosity: 1
    interface: {LOOPBACK}
    port: {port}
    do-ip4: yes
    do-ip6: no
    do-udp: yes
    do-tcp: yes
    do-daemonize: no
    use-syslog: no
    logfile: "{self.log_path}"
    log-time-ascii: yes
    chroot: ""
    username: ""
    directory: "{self.workdir}"
    pidfile: ""
    num-threads: 1
    so-reuseport: no
    outgoing-interface: {LOOPBACK}
    access-control: 127.0.0.0/8 allow
    access-control: 0.0.0.0/0 refuse
    access-control: ::0/0 refuse
    hide-identity: yes
    hide-version: yes
{self.nodefault}{self.config_body}
remote-control:
    control-enable: no
"""

    def start(self, ready, timeout: float = 10.0, attempts: int = 5) -> int:
        """Start with a free port; wait until ``ready(port)`` is true.

        :return: the port (UDP and TCP).
        :raises HarnessError: unbound exited (config error; log in the message).
        :raises TimeoutError: not ready within ``timeout`` seconds.
        """
        last: Exception | None = None
        for _ in range(attempts):
            port = free_port(LOOPBACK)
            conf = self.workdir / f"{self.label}.conf"
            conf.write_text(self._config(port))
            self.log_path.unlink(missing_ok=True)
            with open(self.workdir / f"{self.label}.stderr", "wb") as err:
                self.proc = subprocess.Popen(
                    [UNBOUND, "-d", "-c", str(conf)],
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=subprocess.STDOUT,
                )

            def up(port: int = port) -> bool:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    stderr = (self.workdir / f"{self.label}.stderr").read_text(errors="replace")
                    raise HarnessError(
                        f"unbound ({self.label}) exited with {self.proc.returncode}:\n"
                        f"{stderr}\n{self.log()}"
                    )
                try:
                    return bool(ready(port))
                except OSError:
                    return False

            try:
                wait_for(up, timeout, interval=0.05,
                         what=f"unbound ({self.label}) to be ready on port {port}")
            except HarnessError as exc:
                last = exc
                self.stop()
                if "bind" in str(exc).lower() or "address already in use" in str(exc).lower():
                    continue  # lost a port race: try another port
                raise
            except BaseException:
                self.stop()
                raise
            self.port = port
            return port
        assert last is not None
        raise last

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc)
            self.proc = None


class DNSSECHarness:
    """Signed zones, their authorities and a validating resolver, all on loopback.

    :param zones: the zones; the topmost signed zone (fewest labels) becomes
        the resolver's trust anchor (``trust_anchor`` overrides).
    :param workdir: directory for keys, zone files, configs and logs (default:
        a new temporary directory, removed by :meth:`stop`).
    :param trust_anchor: origin of the zone whose DS is the trust anchor.

    After :meth:`start`, ``port`` is the resolver's UDP/TCP port on 127.0.0.1,
    ``authority_ports`` maps each origin to its authority's port, and
    ``ds[origin]`` is the DS record text of each signed zone. Use as a context
    manager or call :meth:`start`/:meth:`stop`.
    """

    def __init__(
        self,
        zones: list[Zone],
        workdir: str | os.PathLike[str] | None = None,
        trust_anchor: str | None = None,
    ) -> None:
        self.zones = {z.origin: z for z in zones}
        if len(self.zones) != len(zones):
            raise ValueError("two zones with the same origin")
        signed = sorted((z.origin for z in zones if z.signed), key=lambda o: o.count("."))
        if trust_anchor is None and not signed:
            raise ValueError("no signed zone to use as the trust anchor")
        self.trust_anchor = (trust_anchor.rstrip(".") + ".") if trust_anchor else signed[0]
        if self.trust_anchor not in self.zones or not self.zones[self.trust_anchor].signed:
            raise ValueError(f"trust anchor {self.trust_anchor} is not a signed zone here")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.port: int | None = None
        self.authority_ports: dict[str, int] = {}
        self.ds: dict[str, str] = {}
        self._authorities: dict[str, _Unbound] = {}
        self._resolver: _Unbound | None = None
        self.setup_seconds: float | None = None

    # -- zone building -------------------------------------------------------

    def _zone_text(self, zone: Zone) -> str:
        lines = [
            f"$ORIGIN {zone.origin}",
            f"$TTL {zone.ttl}",
            f"@ IN SOA ns.{zone.origin} hostmaster.{zone.origin} 1 3600 600 86400 60",
            f"@ IN NS ns.{zone.origin}",
            f"ns.{zone.origin} IN A {LOOPBACK}",
        ]
        for child in self.zones.values():
            if _parent_zone(child.origin, self.zones) == zone.origin:
                lines.append(f"{child.origin} IN NS ns.{child.origin}")
                lines.append(f"ns.{child.origin} IN A {LOOPBACK}")
                if child.signed:
                    lines.append(self.ds[child.origin])
        lines.extend(zone.records)
        return "\n".join(lines) + "\n"

    def _build_zone(self, zone: Zone) -> Path:
        """Write (and sign) one zone file; children must be built first (their DS)."""
        assert self.workdir is not None
        base = zone.origin.rstrip(".") or "root"
        path = self.workdir / f"{base}.zone"
        path.write_text(self._zone_text(zone))
        if not zone.signed:
            return path
        keydir = self.workdir / f"keys-{base}"
        keydir.mkdir(exist_ok=True)
        key = _run([LDNS_KEYGEN, "-a", ALGORITHM, "-k", zone.origin], keydir).strip()
        self.ds[zone.origin] = (keydir / f"{key}.ds").read_text().strip()
        now = int(time.time())
        signed_path = self.workdir / f"{base}.zone.signed"
        _run(
            [
                LDNS_SIGNZONE,
                "-i", str(now - 3600),
                "-e", str(now + 30 * 86400),
                "-o", zone.origin,
                "-f", str(signed_path),
                str(path),
                str(keydir / key),
            ],
            self.workdir,
        )
        text = signed_path.read_text()
        for owner, rrtype in zone.corrupt:
            text, n = _corrupt_rrsig(text, owner, rrtype)
            if n == 0:
                raise HarnessError(f"no RRSIG for {owner} {rrtype} to corrupt in {zone.origin}")
        signed_path.write_text(text)
        return signed_path

    # -- processes -------------------------------------------------------------

    def _nodefault(self) -> list[str]:
        """Every zone origin and its ancestors: Unbound otherwise answers some of
        them (``test.``, ``invalid.``, ... RFC 6761) from built-in local zones."""
        names = set()
        for origin in self.zones:
            labels = origin.rstrip(".").split(".")
            for i in range(len(labels)):
                if labels[i:] != [""]:
                    names.add(".".join(labels[i:]) + ".")
        return sorted(names)

    def start(self, timeout: float = 10.0) -> int:
        """Build and sign the zones, start the authorities and the resolver.

        :param timeout: the bound on each server's start-up, in seconds.
        :return: the validating resolver's port on 127.0.0.1.
        :raises FileNotFoundError: unbound or an ldns tool is not installed.
        :raises HarnessError: a tool failed or a server exited (output attached).
        :raises TimeoutError: a server did not answer in time.
        """
        missing = missing_tools()
        if missing:
            raise FileNotFoundError(f"missing: {', '.join(missing)}")
        started = time.monotonic()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="dnssec-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            # Children before parents: a parent needs its signed children's DS.
            files = {}
            for origin in sorted(self.zones, key=lambda o: -o.count(".")):
                files[origin] = self._build_zone(self.zones[origin])
            for origin, path in files.items():
                auth = _Unbound(f"auth-{origin.rstrip('.') or 'root'}", self.workdir, f"""
    module-config: "iterator"
    do-not-query-address: 0.0.0.0/0
    do-not-query-address: ::/0
auth-zone:
    name: "{origin}"
    zonefile: "{path}"
    for-downstream: yes
    for-upstream: no
    fallback-enabled: no
""", nodefault=self._nodefault())
                self._authorities[origin] = auth

                def soa_ok(port: int, origin: str = origin) -> bool:
                    from twisted.names import dns

                    rcode, _, n = _dns_query(port, origin, dns.SOA, timeout=0.2)
                    return rcode == 0 and n > 0

                self.authority_ports[origin] = auth.start(soa_ok, timeout)
            anchor = self.workdir / "trust-anchor.ds"
            anchor.write_text(self.ds[self.trust_anchor] + "\n")
            # "." goes to an authority too (which refuses what it does not
            # serve): the resolver never asks anything off loopback.
            root = self.authority_ports.get(".", self.authority_ports[self.trust_anchor])
            stubs = [(".", root), *((o, p) for o, p in self.authority_ports.items() if o != ".")]
            stub_text = "".join(
                f'stub-zone:\n    name: "{o}"\n    stub-addr: {LOOPBACK}@{p}\n' for o, p in stubs
            )
            self._resolver = _Unbound("resolver", self.workdir, f"""
    module-config: "validator iterator"
    trust-anchor-file: "{anchor}"
    do-not-query-localhost: no
    qname-minimisation: no
    aggressive-nsec: no
    prefetch: no
    target-fetch-policy: "0 0 0 0 0"
    val-log-level: 2
    trust-anchor-signaling: no
    root-key-sentinel: no
    log-servfail: yes
{stub_text}""", nodefault=self._nodefault())

            def validated(port: int) -> bool:
                from twisted.names import dns

                rcode, ad, n = _dns_query(port, self.trust_anchor, dns.SOA, timeout=0.2)
                if rcode == 0 and n and not ad:
                    log = self._resolver.log() if self._resolver else ""
                    raise HarnessError(
                        f"resolver answered {self.trust_anchor} SOA without the AD bit: "
                        f"validation is not working\n{log}"
                    )
                return rcode == 0 and n > 0

            self.port = self._resolver.start(validated, timeout)
        except BaseException:
            self.stop()
            raise
        self.setup_seconds = time.monotonic() - started
        return self.port

    def logs(self) -> str:
        """All servers' logs so far, concatenated (str), for failure messages."""
        parts = []
        for server in [*self._authorities.values(), self._resolver]:
            if server is not None:
                parts.append(f"--- {server.label}\n{server.log()}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop every server (SIGTERM, SIGKILL after 10 s); remove an own workdir."""
        for server in [self._resolver, *self._authorities.values()]:
            if server is not None:
                server.stop()
        self._resolver = None
        self._authorities = {}
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> DNSSECHarness:
        if self.port is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
