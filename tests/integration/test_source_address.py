"""--source-address: outgoing SMTP connections are made from the address
given (issue 12 item 4), seen by the server as the peer; bad values refused."""

from __future__ import annotations

import pytest

from tests.support.daemon import Daemon
from tests.support.peers import AiosmtpdSink
from twisted_mailout import enqueue
from twisted_mailout.daemon.config import Config, ConfigError

MSG = b"From: a@origin.test\r\nTo: u@dest.test\r\nSubject: s\r\n\r\nbody\r\n"


def test_connections_come_from_the_source_address(tmp_path):
    sink = AiosmtpdSink("127.0.0.1").start()
    q = tmp_path / "q"
    try:
        enqueue(str(q), "a@origin.test", ["u@dest.test"], MSG)
        d = Daemon(q, f"--relay=127.0.0.1:{sink.port}", "--tls=none",
                   "--resolver=127.0.0.1:53", "--source-address=127.0.0.2", "--no-http",
                   log=tmp_path / "daemon.log").start()
        try:
            [got] = sink.wait_for_messages(1, timeout=30)
        finally:
            d.stop()
        assert got["peer"][0] == "127.0.0.2"
    finally:
        sink.stop()


@pytest.mark.parametrize("addrs", [("example.org",), ("127.0.0.2", "127.0.0.3"),
                                   ("::1", "::2")])
def test_bad_source_addresses_are_refused(tmp_path, addrs):
    with pytest.raises(ConfigError, match="--source-address"):
        Config(queue=str(tmp_path / "q"), source_addresses=addrs)
