"""The log:// and mock:// deliveries: marrow.mailer's logging transport (its
DELIVER line, levels and logger name, read back from real logging records)
and its mock transport (success, failure and exhaustion probabilities,
repeatable with a seed)."""

from __future__ import annotations

import collections
import logging
import threading

import pytest

from twisted_mailout import AddressError
from twisted_mailout.apps.deliveries import DeliveryError, get_delivery, parse_url, schemes
from twisted_mailout.apps.logdelivery import AddressList, LogDelivery, parse_level
from twisted_mailout.apps.mock import MockDelivery, TransportExhausted
from twisted_mailout.errors import MailoutError

MSG = (b"From: Ann Example <ann@origin.test>, bob@origin.test\r\nTo: c@dest.test\r\n"
       b"Message-ID: <log-1@origin.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
       b"Subject: logged\r\n\r\nbody line\r\n")


class Records(logging.Handler):
    """Keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def capture():
    """``capture(name) -> list``: the records of logger ``name`` from now on."""
    undo = []

    def start(name: str) -> list[logging.LogRecord]:
        logger = logging.getLogger(name)
        handler = Records()
        old = (logger.level, logger.propagate)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        undo.append((logger, handler, old))
        return handler.records

    yield start
    for logger, handler, (level, propagate) in undo:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def records(capture):
    """The records of this module's default logger."""
    return capture("twisted_mailout.apps.logdelivery")


# -- log:// -------------------------------------------------------------------


def test_log_writes_marrow_mailers_deliver_line_then_the_message(records):
    delivery = get_delivery("log://")
    mid = delivery.send("ann@origin.test", ["c@dest.test", "d@dest.test"], MSG)
    assert len(mid) == 23
    line, body = records
    # marrow.mailer: log.info("DELIVER %s %s %d %r %r", id, date.isoformat(), len, author, rcpts)
    assert line.msg == "DELIVER %s %s %d %r %r"
    assert line.levelno == logging.INFO
    assert line.getMessage() == (
        f"DELIVER <log-1@origin.test> 2026-11-23T10:00:00+01:00 {len(MSG)} "
        'AddressList("Ann Example <ann@origin.test>, bob@origin.test") '
        'AddressList("c@dest.test, d@dest.test")')
    assert line.args[3] == ["Ann Example <ann@origin.test>", "bob@origin.test"]
    assert line.args[4] == ["c@dest.test", "d@dest.test"]
    # marrow.mailer: log.critical(str(message))
    assert body.levelno == logging.CRITICAL
    assert body.getMessage() == MSG.decode()
    assert line.name == body.name == "twisted_mailout.apps.logdelivery"


def test_log_adds_a_message_id_and_date_when_missing(records):
    LogDelivery().send("a@origin.test", "b@dest.test", b"Subject: bare\r\n\r\nx\r\n")
    line = records[0]
    assert line.args[0].startswith("<") and line.args[0].endswith(">")
    assert "T" in line.args[1]
    assert repr(line.args[3]) == "AddressList()"
    assert body_text(records[1]).startswith("Message-ID: ")


def body_text(record: logging.LogRecord) -> str:
    return record.getMessage()


def test_log_url_names_the_logger_and_the_levels(capture):
    records = capture("mailer")
    delivery = get_delivery("log://?name=mailer&level=warning&message_level=off")
    assert delivery.url() == "log://?name=mailer&level=warning&message_level=off"
    delivery.send("a@origin.test", "b@dest.test", MSG, message_id="0" * 23)
    [line] = records
    assert line.name == "mailer"
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith("DELIVER <log-1@origin.test> ")


def test_log_levels_by_number_and_a_non_ascii_author_encoded_as_marrow_does(capture):
    records = capture("mailer.debug")
    delivery = LogDelivery(name="mailer.debug", level="15", message_level="DEBUG")
    data = MSG.replace(b"Ann Example", b"=?utf-8?q?Ren=C3=A9e?=")
    delivery.send("a@origin.test", "b@dest.test", data)
    line, body = records
    assert (line.levelno, body.levelno) == (15, logging.DEBUG)
    # marrow.mailer's Address: Header(name, "utf-8").encode(), base64 encoded words
    assert line.args[3][0] == "=?utf-8?b?UmVuw6ll?= <ann@origin.test>"
    assert delivery.url() == "log://?name=mailer.debug&level=15&message_level=debug"


def test_log_refuses_bad_input_before_logging(records):
    with pytest.raises(AddressError):
        LogDelivery().send("a@origin.test", [], MSG)
    assert records == []


@pytest.mark.parametrize("url,message", [
    ("log://?level=loud", "unknown logging level"),
    ("log://?level=off", "a logging level is needed"),
    ("log://?colour=red", "unknown parameter"),
    ("log://?name=a&name=b", "given 2 times"),
    ("log://?name=", "needs a logger name"),
    ("log://host", "takes only parameters"),
    ("log:///path", "takes only parameters"),
])
def test_log_url_errors(url, message):
    with pytest.raises(ValueError, match=message):
        parse_url(url)


def test_parse_level():
    assert parse_level("Info") == logging.INFO
    assert parse_level(logging.ERROR) == logging.ERROR
    assert parse_level("warn") == logging.WARNING
    assert parse_level("off", allow_off=True) is None
    assert parse_level(None, allow_off=True) is None
    for bad in ("-1", -5, True, "verbose"):
        with pytest.raises(ValueError):
            parse_level(bad)
    assert repr(AddressList(["a@b"])) == 'AddressList("a@b")'


def test_both_schemes_are_registered():
    assert {"log", "mock"} <= set(schemes())
    assert parse_url("log://?level=debug") == {"scheme": "log", "level": "debug"}
    assert parse_url("mock://?success=0.5&seed=3") == {"scheme": "mock", "success": 0.5,
                                                       "seed": 3}


# -- mock:// ------------------------------------------------------------------


def outcomes(delivery: MockDelivery, n: int) -> list[str]:
    """What each of ``n`` sends did: ok, failed, rejected or exhausted."""
    out = []
    for i in range(n):
        try:
            delivery.send("a@origin.test", "b@dest.test", MSG, message_id=f"{i:023d}")
        except TransportExhausted:
            out.append("exhausted")
            delivery.exhausted = False  # a test may look past exhaustion
        except DeliveryError as e:
            out.append({"deferred": "failed", "bounced": "rejected"}[e.status])
        else:
            out.append("ok")
    return out


def test_mock_default_takes_every_message_and_draws_nothing():
    delivery = get_delivery("mock://")
    state = delivery._random.getstate()
    assert outcomes(delivery, 5) == ["ok"] * 5
    assert delivery._random.getstate() == state
    assert [m.message_id for m in delivery.outbox] == [f"{i:023d}" for i in range(5)]
    assert delivery.outbox[0].data == MSG
    assert delivery.url() == "mock://?success=1&failure=0&exhaustion=0"


def test_mock_certain_failure_is_a_deferred_delivery_error():
    delivery = get_delivery("mock://?failure=1")
    with pytest.raises(DeliveryError) as info:
        delivery.send("a@origin.test", ["b@dest.test", "c@dest.test"], MSG)
    assert info.value.status == "deferred"
    assert info.value.reply.code == 451
    assert info.value.recipients == ["b@dest.test", "c@dest.test"]
    assert delivery.outbox == []


def test_mock_no_success_is_a_bounced_delivery_error():
    delivery = get_delivery("mock://?success=0")
    with pytest.raises(DeliveryError) as info:
        delivery.send("a@origin.test", "b@dest.test", MSG)
    assert info.value.status == "bounced"
    assert info.value.reply.code == 550
    assert delivery.outbox == []


def test_mock_exhaustion_delivers_then_refuses_further_use():
    delivery = get_delivery("mock://?exhaustion=1.0")
    with pytest.raises(TransportExhausted) as info:
        delivery.send("a@origin.test", "b@dest.test", MSG, message_id="1" * 23)
    error = info.value
    assert isinstance(error, MailoutError) and not isinstance(error, DeliveryError)
    assert (error.message_id, error.recipients, error.delivery) == (
        "1" * 23, ["b@dest.test"], delivery)
    assert [m.message_id for m in delivery.outbox] == ["1" * 23]
    assert delivery.exhausted
    with pytest.raises(RuntimeError, match="exhausted"):
        delivery.send("a@origin.test", "b@dest.test", MSG)
    assert len(delivery.outbox) == 1


def test_mock_failure_is_drawn_before_exhaustion_as_marrow_does():
    delivery = MockDelivery(failure=1.0, exhaustion=1.0)
    assert outcomes(delivery, 3) == ["failed"] * 3
    delivery = MockDelivery(success=0.0, exhaustion=1.0)
    assert outcomes(delivery, 2) == ["exhausted"] * 2


def test_mock_seed_repeats_the_sequence_and_the_frequencies_match():
    url = "mock://?success=0.7&failure=0.2&exhaustion=0.1&seed=1234"
    first = outcomes(get_delivery(url), 4000)
    assert outcomes(get_delivery(url), 4000) == first
    assert outcomes(get_delivery(url.replace("1234", "99")), 4000) != first
    counts = collections.Counter(first)
    # failure 0.2; exhaustion 0.8 * 0.1 = 0.08; rejection 0.8 * 0.9 * 0.3 = 0.216
    expected = {"failed": 0.2, "exhausted": 0.08, "rejected": 0.216, "ok": 0.504}
    for kind, p in expected.items():
        assert abs(counts[kind] / 4000 - p) < 0.03, (kind, counts)


def test_mock_is_thread_safe():
    delivery = MockDelivery(success=0.5, seed=7)
    results: list[str] = []
    lock = threading.Lock()

    def work(start: int) -> None:
        for i in range(200):
            try:
                delivery.send("a@origin.test", "b@dest.test", MSG,
                              message_id=f"{start + i:023d}")
                outcome = "ok"
            except DeliveryError:
                outcome = "rejected"
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=work, args=(n * 1000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 800
    assert len(delivery.outbox) == results.count("ok")
    assert len({m.message_id for m in delivery.outbox}) == len(delivery.outbox)
    # the same 800 draws as one thread makes them
    assert results.count("ok") == outcomes(MockDelivery(success=0.5, seed=7), 800).count("ok")


@pytest.mark.parametrize("url,message", [
    ("mock://?success=1.1", "from 0 to 1"),
    ("mock://?failure=-0.1", "from 0 to 1"),
    ("mock://?exhaustion=nan", "from 0 to 1"),
    ("mock://?failure=often", "from 0 to 1"),
    ("mock://?seed=x", "seed must be an integer"),
    ("mock://?die=1", "unknown parameter"),
    ("mock://?seed=1&seed=2", "given 2 times"),
    ("mock://host", "takes only parameters"),
])
def test_mock_url_errors(url, message):
    with pytest.raises(ValueError, match=message):
        parse_url(url)


def test_mock_constructor_checks_its_arguments():
    with pytest.raises(ValueError):
        MockDelivery(success=True)
    with pytest.raises(ValueError):
        MockDelivery(seed="1.5")
    assert MockDelivery(seed="12").seed == 12
    assert MockDelivery(seed=5).url() == "mock://?success=1&failure=0&exhaustion=0&seed=5"


def test_mock_bad_input_makes_no_draw():
    delivery = MockDelivery(success=0.5, seed=1)
    state = delivery._random.getstate()
    with pytest.raises(AddressError):
        delivery.send("a@origin.test", [], MSG)
    assert delivery._random.getstate() == state
