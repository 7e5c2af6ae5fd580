"""The parent's side of --workers, without processes: merging the workers'
answers, the configuration handed to a worker, and log events carried up."""

from __future__ import annotations

import json

import pytest
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure

from twisted_mailout.daemon.config import Config, ConfigError
from twisted_mailout.daemon.worker import (
    config_from_json,
    config_to_json,
    decode_events,
    encode_event,
)
from twisted_mailout.daemon.workerapi import merge_json


def test_counts_add_up_and_rows_merge_by_name():
    a = {"queue": {"active": 2, "deferred": 1, "total": 3}, "now": 100.0, "window": 3600,
         "outcomes": {"time": [60, 120], "delivered": [1, 2]},
         "destinations": [{"destination": "a.test", "deferred": 1, "last_time": 5.0}],
         "suspensions": [{"id": "s1", "domain": "x.test"}]}
    b = {"queue": {"active": 1, "deferred": 0, "total": 1}, "now": 101.0, "window": 3600,
         "outcomes": {"time": [60, 120], "delivered": [3, 4]},
         "destinations": [{"destination": "a.test", "deferred": 2, "last_time": 9.0},
                          {"destination": "b.test", "deferred": 1, "last_time": 1.0}],
         "suspensions": [{"id": "s1", "domain": "x.test"}]}
    m = merge_json([a, b])
    assert m["queue"] == {"active": 3, "deferred": 1, "total": 4}
    assert m["now"] == 101.0 and m["window"] == 3600  # not counts
    assert m["outcomes"] == {"time": [60, 120], "delivered": [4, 6]}
    assert m["destinations"] == [{"destination": "a.test", "deferred": 3, "last_time": 9.0},
                                 {"destination": "b.test", "deferred": 1, "last_time": 1.0}]
    assert m["suspensions"] == [{"id": "s1", "domain": "x.test"}]


def test_action_results_and_summaries_merge():
    r = merge_json([{"action": "hold", "matched": 3, "changed": 2, "queue_ids": ["A", "B"],
                     "skipped": [], "dsn_queue_ids": []},
                    {"action": "hold", "matched": 1, "changed": 1, "queue_ids": ["C"],
                     "skipped": [{"queue_id": "D", "why": "x"}], "dsn_queue_ids": []}])
    assert r == {"action": "hold", "matched": 4, "changed": 3, "queue_ids": ["A", "B", "C"],
                 "skipped": [{"queue_id": "D", "why": "x"}], "dsn_queue_ids": []}
    s = merge_json([{"by": "domain", "buckets": ["5", "10"], "messages": 2,
                     "total": {"total": 2, "counts": [1, 1]},
                     "rows": [{"domain": "a", "total": 2, "counts": [1, 1]}]},
                    {"by": "domain", "buckets": ["5", "10"], "messages": 1,
                     "total": {"total": 1, "counts": [0, 1]},
                     "rows": [{"domain": "a", "total": 1, "counts": [0, 1]}]}])
    assert s["buckets"] == ["5", "10"] and s["messages"] == 3
    assert s["rows"] == [{"domain": "a", "total": 3, "counts": [1, 2]}]


def test_the_configuration_survives_the_trip_to_a_worker(tmp_path):
    c = Config(queue=str(tmp_path), relay="127.0.0.1:2525", resolvers=("127.0.0.1:53",),
               http=("tcp:0:interface=127.0.0.1",), workers=3, max_connections=7)
    back = config_from_json(config_to_json(c))
    assert back == c and isinstance(back.resolvers, tuple)
    with pytest.raises(ConfigError, match="--workers"):
        Config(queue=str(tmp_path), workers=0)
    with pytest.raises(ConfigError, match="PostgreSQL"):
        Config(queue="postgresql://x/y", workers=2)
    with pytest.raises(ValueError):
        config_from_json("[1]")


def test_log_events_arrive_in_the_parent_as_they_left():
    event = {"log_format": "{text}", "text": "QID: to=<a@b.test>, status=sent",
             "log_level": LogLevel.info, "log_namespace": "mailout.scheduler",
             "qid": "QID", "outcome": "delivered", "code": 250, "log_time": 1.5,
             "log_logger": object()}
    (back,) = decode_events(encode_event(event), 3)
    assert formatEvent(back) == "QID: to=<a@b.test>, status=sent"
    assert back["log_level"] is LogLevel.info and back["log_system"] == "worker-3"
    assert back["qid"] == "QID" and back["code"] == 250 and back["log_worker"] == 3
    assert "log_logger" not in back  # not JSON: dropped
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    err = {"log_format": "boom {n}", "n": 2, "log_level": LogLevel.error,
           "log_failure": failure}
    (back,) = decode_events(encode_event(err) + "\nnot json\n", 0)
    assert formatEvent(back).startswith("boom 2\n") and "ZeroDivisionError" in back["log_text"]
    assert json.loads(encode_event(err))["log_level"] == "error"


def test_the_options_for_workers_and_chunking(tmp_path):
    from twisted.python import usage

    from twisted_mailout.daemon.tap import Options
    from twisted_mailout.daemon.workers import default_workers

    o = Options()
    o.parseOptions(["--queue", str(tmp_path), "--workers", "3", "--no-chunking"])
    assert o["config"].workers == 3 and o["config"].chunking is False
    o = Options()
    o.parseOptions(["--queue", str(tmp_path), "--workers", "auto", "--max-workers", "1"])
    assert o["config"].workers == 1 == default_workers(1)
    assert o["config"].chunking is True
    for bad in (["--workers", "many"], ["--workers", "0"], ["--workers", "65"]):
        with pytest.raises(usage.UsageError, match="--workers"):
            Options().parseOptions(["--queue", str(tmp_path), *bad])
