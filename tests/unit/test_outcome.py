"""One outcome vocabulary: the Status enum and the
per-recipient result shared by the scheduler, the API, the mailer and the logs."""

from __future__ import annotations

import pytest

from twisted_mailout.envelope import Reply
from twisted_mailout.outcome import DeliveryReport, RecipientResult, Status


@pytest.mark.parametrize(("code", "status"), [
    (250, Status.DELIVERED), (251, Status.DELIVERED), (421, Status.DEFERRED),
    (452, Status.DEFERRED), (550, Status.BOUNCED), (554, Status.BOUNCED)])
def test_a_reply_code_gives_the_status(code, status):
    assert Status.of_reply(Reply(code, "x")) is status


def test_status_compares_equal_to_its_word():
    # Code written against the old string statuses keeps working.
    assert Status.DELIVERED == "delivered"
    assert Status.EXPIRED in {"bounced", "expired"}
    assert f"{Status.DEFERRED}" == "deferred"


def test_the_daemons_old_word_sent_parses_as_delivered_and_nothing_unknown_does():
    assert Status.parse("sent") is Status.DELIVERED
    assert Status.parse("expired") is Status.EXPIRED
    with pytest.raises(ValueError, match="unknown outcome status 'lost'"):
        Status.parse("lost")


def test_postfix_wording_is_kept_for_the_log_line_only():
    assert [s.log_word for s in (Status.DELIVERED, Status.DEFERRED, Status.BOUNCED,
                                 Status.EXPIRED)] == ["sent", "deferred", "bounced", "bounced"]
    assert Status.EXPIRED.category is Status.BOUNCED
    assert Status.DELIVERED.category is Status.DELIVERED
    assert [s.is_final for s in Status] == [True, False, True, True, False]


def test_a_result_unpacks_like_twisted_sendmails_per_address_tuples():
    r = RecipientResult.from_reply("b@dest.test", Reply(550, "5.1.1 no such user"),
                                   relay="mx[192.0.2.1]:25")
    address, code, text = r
    assert (address, code, text) == ("b@dest.test", 550, "5.1.1 no such user")
    assert (r[0], r[1], r[2], len(r)) == ("b@dest.test", 550, "5.1.1 no such user", 3)
    assert r.status is Status.BOUNCED
    assert r.enhanced_status == "5.1.1"
    assert r.reply == Reply(550, "5.1.1 no such user")


def test_a_result_takes_a_status_word_and_refuses_an_unknown_one():
    assert RecipientResult("a@x.test", "sent", 250, "ok").status is Status.DELIVERED
    with pytest.raises(ValueError):
        RecipientResult("a@x.test", "gone", 250, "ok")


def test_log_fields_name_the_status_in_each_vocabulary_once():
    r = RecipientResult("b@dest.test", Status.EXPIRED, 451,
                        "4.4.1 no answer (delivery time expired after 5.0 days)",
                        local=True, queue_id="Q1", attempts=9, delay=432000.0)
    f = r.log_fields()
    assert (f["outcome"], f["event"], f["status"]) == ("expired", "bounced", "bounced")
    assert (f["qid"], f["dsn"], f["relay"], f["local"], f["attempts"]) == (
        "Q1", "4.4.1", "none", True, 9)
    assert f["reply"].startswith("451 4.4.1 no answer")


def test_a_report_finds_results_by_recipient_and_counts_what_was_accepted():
    report = DeliveryReport([
        RecipientResult("a@x.test", Status.DELIVERED, 250, "ok"),
        RecipientResult("b@x.test", Status.DEFERRED, 451, "later", local=True)])
    assert report["b@x.test"].code == 451
    with pytest.raises(KeyError):
        report["c@x.test"]
    assert (report.accepted, report.all_delivered, len(report)) == (1, False, 2)
    assert [r.recipient for r in report.with_status("deferred")] == ["b@x.test"]
    assert [tuple(r) for r in report] == [("a@x.test", 250, "ok"), ("b@x.test", 451, "later")]
