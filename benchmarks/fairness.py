"""Fairness under slow destinations (issue 14, item 3).

    python benchmarks/fairness.py [--messages 10000] [--domains 100] [--tarpits 10]
                                  [--delay 5] [--runs 3] [--limit 600]
                                  [--daemon-arg=--max-connections=100 ...]
                                  [--json OUT.json] [--workdir /var/tmp]

N queued 2 KB messages, one recipient each, round robin over D recipient
domains, delivered by ``twistd -n mailout --queue DIR`` with MX routing (no
relay) over a loopback DNS zone served by twisted.names (tests/support's
``DnsServerProcess``). Every domain has its own MX host on its own loopback
address (127.0.1.x for the healthy ones, 127.0.2.x for those that become
tarpits), all on one port (``--mx-port``). The healthy hosts are Postfix's
``smtp-sink`` (one process per address). Two cases, alternating, once per
run:

  undisturbed  every domain's host is a smtp-sink;
  tarpits      T of the domains (every D/T-th, so their mail is spread evenly
               through the queue) are tarpits: a small asyncio server in a
               child process of this script that sends every reply (the
               greeting too) ``--delay`` seconds after the command it answers,
               one command after another; it stops by itself after
               ``--tarpit-lifetime`` seconds and takes at most
               ``--tarpit-max-connections`` connections at once.

The figure is the rate of the healthy domains' mail: the messages delivered to
them divided by the time from the daemon's start (its "mailout starting" line)
to the last of them logged ``status=sent``. A case still running after
``--limit`` seconds is cut short and measured over what was delivered by then
(marked partial). The daemon is then stopped (mail still queued for the
tarpits stays queued). CPU: the daemon's, from its start to that moment,
divided by every message it delivered meanwhile (tarpit mail included).

The daemon runs with its defaults (``--max-connections 20``,
``--max-per-destination 4``, in flight ``max(50, 10 x max-connections)``)
plus ``--resolver``, ``--mx-port``, ``--helo``, ``--shutdown-timeout=5`` and
``--poll-interval=1`` and whatever ``--daemon-arg`` adds. Timing is reported,
never asserted; the target (issue 14) is a ratio of at least 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks.common import (  # noqa: E402
    SMTP_SINK,
    Daemon,
    Workdir,
    env,
    message,
    proc_stats,
    stop_process,
)

HEALTHY_NET = "127.0.1."
TARPIT_NET = "127.0.2."


# --------------------------------------------------------------------------- the tarpit


async def _tarpit_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          delay: float, state: dict[str, int], limit: int) -> None:
    """One SMTP session in which every reply comes ``delay`` seconds after its
    command (the greeting ``delay`` seconds after the connection)."""
    if state["open"] >= limit:
        writer.close()
        return
    state["open"] += 1
    try:
        await asyncio.sleep(delay)
        writer.write(b"220 tarpit.test ESMTP slow\r\n")
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            await asyncio.sleep(delay)
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-tarpit.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                             b"250 SIZE 0\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                while True:
                    body = await reader.readline()
                    if not body or body == b".\r\n":
                        break
                if not body:
                    return
                await asyncio.sleep(delay)
                state["messages"] += 1
                writer.write(b"250 2.0.0 Ok: queued slowly\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:  # MAIL, RCPT, RSET, NOOP
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        state["open"] -= 1
        writer.close()


async def _tarpit_main(addresses: list[str], port: int, delay: float, lifetime: float,
                       limit: int) -> None:
    state = {"open": 0, "messages": 0}
    servers = []
    for addr in addresses:
        servers.append(await asyncio.start_server(
            lambda r, w: _tarpit_session(r, w, delay, state, limit), addr, port,
            reuse_address=True, backlog=256))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), lifetime)
    except TimeoutError:
        pass
    for s in servers:
        s.close()
    print(json.dumps({"messages": state["messages"]}), flush=True)


class Tarpit:
    """The tarpit server in a child process (``fairness.py tarpit ...``),
    stopped with SIGTERM by :meth:`stop` (and by itself after ``lifetime``)."""

    def __init__(self, addresses: list[str], port: int, delay: float, lifetime: float,
                 max_connections: int):
        self.cmd = [sys.executable, str(Path(__file__).resolve()), "tarpit",
                    "--port", str(port), "--delay", str(delay), "--lifetime", str(lifetime),
                    "--max-connections", str(max_connections), *addresses]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Tarpit:
        self.proc = subprocess.Popen(self.cmd, env=env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            stop_process(self.proc)
            raise RuntimeError(f"tarpit did not start: {self.proc.stderr.read()!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)


# --------------------------------------------------------------------------- the sinks


class Sinks:
    """One ``smtp-sink`` per address, all on ``port``."""

    def __init__(self, addresses: list[str], port: int):
        self.addresses = addresses
        self.port = port
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Sinks:
        try:
            for addr in self.addresses:
                cmd = [SMTP_SINK]
                if os.geteuid() == 0:
                    cmd += ["-u", "nobody"]
                cmd += [f"{addr}:{self.port}", "256"]
                self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 20
            for addr, proc in zip(self.addresses, self.procs, strict=True):
                while True:
                    try:
                        socket.create_connection((addr, self.port), 1).close()
                        break
                    except OSError:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"smtp-sink on {addr}:{self.port} did not "
                                               "start") from None
                        time.sleep(0.02)
        except BaseException:
            self.__exit__()
            raise
        return self

    def cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                total += proc_stats(p.pid)[0]
            except OSError:
                pass
        return total

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs = []


def free_port_on(addresses: list[str]) -> int:
    """A TCP port free on every one of ``addresses``."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        ok = True
        for addr in addresses[1:]:
            with socket.socket() as s:
                try:
                    s.bind((addr, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no port free on every address")


# --------------------------------------------------------------------------- one case


_SENT = re.compile(rb"to=<[^@>]*@(d\d+)\.test>[^\n]*status=sent")
_BAD = re.compile(rb"status=(?:bounced|expired)")


class Outcomes:
    """Reads the daemon's log as it grows: deliveries by domain."""

    def __init__(self, path: Path, tarpit_domains: set[str]):
        self.path = path
        self.tarpits = {d.encode() for d in tarpit_domains}
        self.pos = 0
        self.rest = b""
        self.healthy = 0
        self.slow = 0
        self.bad = 0
        self.deferred = 0

    def update(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return
        self.pos += len(chunk)
        data = self.rest + chunk
        cut = data.rfind(b"\n") + 1
        data, self.rest = data[:cut], data[cut:]
        for m in _SENT.finditer(data):
            if m.group(1) in self.tarpits:
                self.slow += 1
            else:
                self.healthy += 1
        self.bad += len(_BAD.findall(data))
        self.deferred += data.count(b"status=deferred")


def run_case(base: str | None, n: int, domains: int, tarpit_every: int, tarpits_on: bool,
             delay: float, limit: float, daemon_args: list[str], tarpit_lifetime: float,
             tarpit_max: int) -> dict[str, Any]:
    """Fill a queue, start the peers and the daemon, time the healthy mail."""
    from tests.support.peers import DnsServerProcess

    from benchmarks.run import fill_queue

    names = [f"d{i:02d}" for i in range(domains)]
    slow = {nm for i, nm in enumerate(names) if i % tarpit_every == 0}
    addr = {nm: (TARPIT_NET if nm in slow else HEALTHY_NET) + str(i + 1)
            for i, nm in enumerate(names)}
    records: dict[str, Any] = {}
    for nm in names:
        records[f"{nm}.test"] = {"MX": [[10, f"mx.{nm}.test"]]}
        records[f"mx.{nm}.test"] = {"A": [addr[nm]]}
    healthy_n = sum(1 for i in range(n) if names[i % domains] not in slow)
    with Workdir(base, "mailout-fair-") as tmp:
        q = tmp / "q"
        fill_queue(q, [message(i, 2048, f"{names[i % domains]}.test") for i in range(n)],
                   [f"sink@{names[i % domains]}.test" for i in range(n)])
        port = free_port_on(list(addr.values()))
        fast = [a for nm, a in addr.items() if not (tarpits_on and nm in slow)]
        slow_addrs = [addr[nm] for nm in sorted(slow)] if tarpits_on else []
        dns = DnsServerProcess({"ttl": 3600, "authoritative_for": ["test"],
                                "records": records}, max_lifetime=limit + 300)
        dns_port = dns.start()
        try:
            with Sinks(fast, port), \
                    (Tarpit(slow_addrs, port, delay, tarpit_lifetime, tarpit_max)
                     if slow_addrs else _Null()):
                args = [f"--resolver=127.0.0.1:{dns_port}", f"--mx-port={port}",
                        "--poll-interval=1", *daemon_args]
                out = Outcomes(tmp / "daemon.log", slow)
                with Daemon(q, *args, log=tmp / "daemon.log") as d:
                    t0, c0 = d.wait_ready()
                    deadline = time.monotonic() + limit
                    partial = False
                    last = t0
                    seen = 0
                    while True:
                        out.update()
                        if out.healthy != seen:
                            seen, last = out.healthy, time.perf_counter()
                        if out.healthy >= healthy_n:
                            break
                        if out.bad:
                            raise RuntimeError(f"bounces in the benchmark:\n{d.tail_log()}")
                        if time.monotonic() > deadline:
                            partial = True
                            last = time.perf_counter()
                            break
                        d.alive()
                        time.sleep(0.01)
                    c1 = proc_stats(d.pid)[0]
                    out.update()
        finally:
            dns.stop()
    delivered = out.healthy + out.slow
    return {"rate": seen / (last - t0), "healthy": seen, "seconds": last - t0,
            "slow_delivered": out.slow, "deferred": out.deferred,
            "cpu_ms": (c1 - c0) / max(1, delivered) * 1000, "partial": partial}


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# --------------------------------------------------------------------------- main


def main() -> int:
    """Run the cases side by side; print a table. @return: the exit status."""
    if len(sys.argv) > 1 and sys.argv[1] == "tarpit":
        ap = argparse.ArgumentParser(prog="fairness.py tarpit")
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--delay", type=float, default=5.0)
        ap.add_argument("--lifetime", type=float, default=900.0)
        ap.add_argument("--max-connections", type=int, default=1000)
        ap.add_argument("addresses", nargs="+")
        t = ap.parse_args(sys.argv[2:])
        asyncio.run(_tarpit_main(t.addresses, t.port, t.delay, t.lifetime, t.max_connections))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--domains", type=int, default=100)
    ap.add_argument("--tarpits", type=int, default=10)
    ap.add_argument("--delay", type=float, default=5.0, help="tarpit reply delay, s")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--limit", type=float, default=600.0,
                    help="cut a case short after this many seconds")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="an extra option for the daemon (repeatable)")
    ap.add_argument("--tarpit-lifetime", type=float, default=900.0)
    ap.add_argument("--tarpit-max-connections", type=int, default=1000)
    ap.add_argument("--only", choices=["undisturbed", "tarpits"])
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.tarpits < 1 or a.domains % a.tarpits:
        ap.error("--domains must be a multiple of --tarpits")
    every = a.domains // a.tarpits
    results: dict[str, list[dict[str, Any]]] = {"undisturbed": [], "tarpits": []}
    cases = [a.only] if a.only else ["undisturbed", "tarpits"]
    started = time.perf_counter()
    for run in range(a.runs):
        for case in cases:
            r = run_case(a.workdir, a.messages, a.domains, every, case == "tarpits", a.delay,
                         a.limit, a.daemon_arg, a.tarpit_lifetime, a.tarpit_max_connections)
            results[case].append(r)
            print(f"run {run + 1} {case}: " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    print(f"\n{a.messages:,} messages of 2 KB over {a.domains} domains, {a.tarpits} of them "
          f"tarpits (every reply after {a.delay:g} s) in case 'tarpits'; daemon options: "
          f"{' '.join(a.daemon_arg) or 'defaults'}; median of {a.runs} run(s); "
          f"{os.cpu_count()} cores; load {load:.2f} at the end; "
          f"{time.perf_counter() - started:.0f} s in all.\n")
    print("| case | healthy msg/s | runs: min–max | ratio to undisturbed | healthy delivered "
          "| seconds | tarpit mail delivered meanwhile | CPU ms / msg |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    med: dict[str, float] = {}
    for case in cases:
        rs = results[case]
        if not rs:
            continue
        rate = statistics.median(r["rate"] for r in rs)
        med[case] = rate
        base = med.get("undisturbed")
        label = case + (" (cut short)" if any(r["partial"] for r in rs) else "")
        rates = [r["rate"] for r in rs]
        print(f"| {label} | {rate:.0f} | {min(rates):.0f}–{max(rates):.0f} | "
              f"{rate / base if base else float('nan'):.2f} | "
              f"{statistics.median(r['healthy'] for r in rs):.0f} | "
              f"{statistics.median(r['seconds'] for r in rs):.1f} | "
              f"{statistics.median(r['slow_delivered'] for r in rs):.0f} | "
              f"{statistics.median(r['cpu_ms'] for r in rs):.2f} |")
    if len(med) == 2:
        ratio = med["tarpits"] / med["undisturbed"]
        print(f"\n- [{'x' if ratio >= 0.8 else ' '}] healthy domains keep ≥ 80% of their "
              f"undisturbed rate: {ratio:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results,
                                            "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
