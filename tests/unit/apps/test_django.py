"""The Django email backend with a real Django: 5.2 in this process through
EMAIL_BACKEND, and 6.1 through its MAILERS setting in a virtual environment
of a Python >= 3.12 (Django 6 needs it), created under tmp by the test."""

from __future__ import annotations

import email
import email.policy
import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest
from tests.support.peers import IN_CI

django = pytest.importorskip("django")

from tests.support.django_settings import configure  # noqa: E402

configure()

from django.core import mail  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

from twisted_mailout import AddressError  # noqa: E402
from twisted_mailout.apps.django import EmailBackend  # noqa: E402
from twisted_mailout.apps.deliveries import DeliveryError  # noqa: E402
from twisted_mailout.queue.store import Queue  # noqa: E402
from twisted_mailout.testing import capture_mail  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def queued(path):
    q = Queue(str(path))
    entries, problems = q.pickup_all()
    assert problems == []
    out = []
    for e in sorted(entries, key=lambda e: e.qid):
        data = q.read_message(e)
        out.append((e.sender, [r.address for r in e.recipients], data,
                    email.message_from_bytes(data, policy=email.policy.default)))
    return out


def test_django_5_version_in_process():
    assert django.VERSION[:2] >= (5, 2)


def test_send_mail_queues(tmp_path):
    with override_settings(MAILOUT_DELIVERY=f"queue://{tmp_path}"):
        n = mail.send_mail("Order 1", "Thanks for your order.", None,
                           ["Zoë <zoe@dest.test>", "b@dest.test"])
    assert n == 1
    [(sender, rcpts, data, m)] = queued(tmp_path)
    assert sender == "shop@origin.test"
    assert rcpts == ["zoe@dest.test", "b@dest.test"]
    assert m["Subject"] == "Order 1"
    assert m.get_content().strip() == "Thanks for your order."
    assert data.count(b"\r\n") == data.count(b"\n")  # CRLF throughout


def test_send_mass_mail_counts_each_message(tmp_path):
    datatuple = [("S1", "m1", "a@origin.test", ["x@dest.test"]),
                 ("S2", "m2", "a@origin.test", ["y@dest.test"]),
                 ("S3", "m3", "a@origin.test", ["z@dest.test"])]
    with override_settings(MAILOUT_DELIVERY=f"queue://{tmp_path}"):
        assert mail.send_mass_mail(datatuple) == 3
    assert sorted(r[1][0] for r in queued(tmp_path)) == ["x@dest.test", "y@dest.test",
                                                          "z@dest.test"]


def test_email_multi_alternatives_bcc_cc_and_attachment(tmp_path):
    with override_settings(MAILOUT_DELIVERY=f"queue://{tmp_path}"):
        msg = mail.EmailMultiAlternatives(
            "Report", "plain text", "Reports <reports@origin.test>", ["to@dest.test"],
            cc=["cc@dest.test"], bcc=["hidden@dest.test"], reply_to=["help@origin.test"],
            headers={"X-Campaign": "7"})
        msg.attach_alternative("<p>html</p>", "text/html")
        msg.attach("r.csv", "a,b\n", "text/csv")
        assert msg.send() == 1
    [(sender, rcpts, data, m)] = queued(tmp_path)
    assert sender == "reports@origin.test"
    assert rcpts == ["to@dest.test", "cc@dest.test", "hidden@dest.test"]
    assert b"hidden@dest.test" not in data  # Bcc only in the envelope
    assert m["Cc"] == "cc@dest.test" and m["X-Campaign"] == "7"
    assert m.get_body(("html",)).get_content().strip() == "<p>html</p>"
    [att] = list(m.iter_attachments())
    assert att.get_filename() == "r.csv"


def test_fail_silently_counts_failures_out(tmp_path):
    script = tmp_path / "sendmail"
    script.write_text("#!/bin/sh\ncat >/dev/null\nexit 75\n")
    script.chmod(0o755)
    with override_settings(MAILOUT_DELIVERY=f"sendmail://{script}"):
        assert mail.send_mail("s", "m", None, ["b@dest.test"], fail_silently=True) == 0
        with pytest.raises(DeliveryError, match="EX_TEMPFAIL"):
            mail.send_mail("s", "m", None, ["b@dest.test"])
    with override_settings(MAILOUT_DELIVERY=f"queue://{tmp_path}/q"):
        good = mail.EmailMessage("ok", "m", None, ["b@dest.test"])
        bad = mail.EmailMessage("bad", "m", None, ["not-an-address"])
        conn = mail.get_connection(fail_silently=True)
        assert conn.send_messages([good, bad, good]) == 2
        with pytest.raises(AddressError):
            mail.get_connection().send_messages([bad])
        assert mail.get_connection().send_messages([]) == 0
        # a message without recipients is not sent and not an error
        assert mail.get_connection().send_messages([mail.EmailMessage("x", "m")]) == 0
    assert len(queued(tmp_path / "q")) == 2


def test_configuration_errors(tmp_path):
    with override_settings(MAILOUT_DELIVERY=None):
        with pytest.raises(ImproperlyConfigured, match="MAILOUT_DELIVERY"):
            mail.get_connection()
    with override_settings(MAILOUT_DELIVERY="bogus://"):
        with pytest.raises(ImproperlyConfigured, match="unknown delivery"):
            mail.get_connection()
    with pytest.raises(ImproperlyConfigured, match="apply to smtp:// and smtps://"):
        EmailBackend(delivery="null://", username="u", password="p")
    # an explicit delivery option wins over the setting
    backend = EmailBackend(delivery=f"file://{tmp_path}/eml")
    assert backend.send_messages([mail.EmailMessage("f", "m", None, ["b@dest.test"])]) == 1
    assert len(os.listdir(tmp_path / "eml")) == 1


# smtp:// with no reactor running (twisted_mailout.blocking runs one) is tested in a
# child process, whose reactor may start: tests/integration/test_django_smtp.py


def test_capture_mail_catches_djangos_mail(tmp_path):
    with override_settings(MAILOUT_DELIVERY=f"queue://{tmp_path}"), capture_mail() as outbox:
        mail.send_mail("Hello", "body", None, ["b@dest.test"])
    outbox.assert_sent(1, to="b@dest.test", subject="Hello", sender="shop@origin.test")
    assert os.listdir(tmp_path / "new") == []


def test_on_commit_sends_only_when_the_database_transaction_commits(tmp_path):
    from django.db import transaction

    events = []
    backend = EmailBackend(delivery=f"queue://{tmp_path}", on_commit=True,
                           observers=[events.append])
    m = mail.EmailMessage("Order", "thanks", None, ["b@dest.test"])
    with transaction.atomic():
        assert backend.send_messages([m]) == 1
        assert os.listdir(tmp_path / "new") == []  # not before the commit
    assert len(os.listdir(tmp_path / "new")) == 1
    with pytest.raises(RuntimeError, match="rolled back"):
        with transaction.atomic():
            backend.send_messages([m])
            raise RuntimeError("rolled back")
    assert len(os.listdir(tmp_path / "new")) == 1  # the rollback dropped it
    # bad input fails at send time, not at commit
    with transaction.atomic():
        with pytest.raises(AddressError):
            backend.send_messages([mail.EmailMessage("x", "m", None, ["bad"])])
    # outside atomic(): at once; the setting turns it on too
    with override_settings(MAILOUT_DELIVERY=f"queue://{tmp_path}", MAILOUT_ON_COMMIT=True):
        conn = mail.get_connection()
        assert conn.on_commit
        conn.send_messages([m])
    assert len(os.listdir(tmp_path / "new")) == 2
    assert [e.status for e in events] == ["queued"]


def test_on_commit_failure_after_commit_goes_to_observers(tmp_path):
    from django.db import transaction

    script = tmp_path / "sendmail"
    script.write_text("#!/bin/sh\ncat >/dev/null\nexit 67\n")
    script.chmod(0o755)
    events = []
    backend = EmailBackend(delivery=f"sendmail://{script}", on_commit=True,
                           observers=[events.append])
    with transaction.atomic():
        assert backend.send_messages([mail.EmailMessage("s", "m", None, ["b@dest.test"])]) == 1
    assert [(e.status, e.code) for e in events] == [("bounced", 550)]


# -- Django 6.1 and its MAILERS setting ----------------------------------------

def find_python312() -> str | None:
    """A working interpreter >= 3.12 (pyenv shims may exist but not work)."""
    candidates = []
    for name in ("python3.12", "python3.13", "python3.14", "python3"):
        found = shutil.which(name)
        if found:
            candidates.append(found)
    home = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(home, "versions", "3.1[2-9]*", "bin",
                                                "python3.1[2-9]")))
    for exe in candidates:
        try:
            out = subprocess.run([exe, "-c", "import sys, venv; print(sys.version_info >= "
                                  "(3, 12))"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "True":
            return exe
    return None


SCRIPT = """
import json, os, sys, warnings
warnings.simplefilter("ignore")
import django
from django.conf import settings
settings.configure(
    MAILERS={
        "default": {"BACKEND": "twisted_mailout.contrib.django.EmailBackend",
                    "OPTIONS": {"delivery": "queue://" + sys.argv[1]}},
        "files": {"BACKEND": "twisted_mailout.contrib.django.EmailBackend",
                  "OPTIONS": {"delivery": {"url": "file://" + sys.argv[2]}}},
        "typo": {"BACKEND": "twisted_mailout.contrib.django.EmailBackend",
                 "OPTIONS": {"delivery": "null://", "colour": "red"}},
    },
    DEFAULT_FROM_EMAIL="Shop <shop@origin.test>",
    INSTALLED_APPS=[],
)
django.setup()
from django.core import mail
out = {"version": django.get_version()}
out["send_mail"] = mail.send_mail("S1", "m1", None, ["a@dest.test"])
out["using"] = mail.send_mail("S2", "m2", None, ["b@dest.test"], using="files")
out["mass"] = mail.send_mass_mail([("S3", "m3", None, ["c@dest.test"]),
                                   ("S4", "m4", None, ["d@dest.test"])])
m = mail.EmailMultiAlternatives("S5", "text", None, ["e@dest.test"], bcc=["hidden@dest.test"])
m.attach_alternative("<p>h</p>", "text/html")
out["alternatives"] = m.send()
out["alias"] = mail.mailers["default"].alias
with mail.mailers["default"] as conn:
    out["fail_silently"] = mail.get_connection(fail_silently=True).send_messages(
        [mail.EmailMessage("bad", "m", None, ["not-an-address"])])
try:
    mail.mailers["typo"]
except Exception as e:
    out["typo"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def django61_python():
    exe = find_python312()
    if exe is None:
        msg = "no Python >= 3.12 with venv for Django 6.1"
        if IN_CI:
            pytest.fail(msg + " (CI=true)")
        pytest.skip(msg)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    key = hashlib.sha256(json.dumps([exe, deps]).encode()).hexdigest()[:12]
    venv = Path(tempfile.gettempdir()) / f"twisted-mailout-django61-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([exe, "-m", "venv", str(venv)], check=True, timeout=120)
        r = subprocess.run([str(python), "-m", "pip", "install", "-q",
                            "--disable-pip-version-check", "Django~=6.1.0", *deps],
                           capture_output=True, text=True, timeout=240)
        if r.returncode != 0:
            pytest.fail(f"pip install Django 6.1 failed:\n{r.stdout}\n{r.stderr}")
        (venv / ".complete").write_text("ok\n")
    return str(python)


@pytest.mark.slow  # builds a virtual environment with Django 6.1 (a download on a new machine)
def test_django_61_mailers_setting(django61_python, tmp_path):
    qdir, fdir = tmp_path / "q", tmp_path / "eml"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    r = subprocess.run([django61_python, "-c", SCRIPT, str(qdir), str(fdir)],
                       capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["version"].startswith("6.1")
    assert (out["send_mail"], out["using"], out["mass"], out["alternatives"]) == (1, 1, 2, 1)
    assert out["alias"] == "default"
    assert out["fail_silently"] == 0
    assert out["typo"].startswith("InvalidMailer") and "colour" in out["typo"]
    got = queued(qdir)
    assert sorted(r[1][0] for r in got) == ["a@dest.test", "c@dest.test", "d@dest.test",
                                            "e@dest.test"]
    [s5] = [g for g in got if g[3]["Subject"] == "S5"]
    assert s5[1] == ["e@dest.test", "hidden@dest.test"] and b"hidden" not in s5[2]
    assert len(os.listdir(fdir)) == 1
