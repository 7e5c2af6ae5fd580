"""Django's own test runner over a project whose EMAIL_BACKEND is ours: the
runner swaps in the locmem backend, so ``mail.outbox`` works as in any Django
project, and in the same run our backend (named explicitly) still sends, seen
by ``twisted_mailout.testing.capture_mail``. Run in a child process with
``manage.py test``'s machinery (DiscoverRunner), as a project runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("django")

REPO = Path(__file__).resolve().parents[2]

SETTINGS = """
SECRET_KEY = "test"
INSTALLED_APPS = []
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
EMAIL_BACKEND = "twisted_mailout.contrib.django.EmailBackend"
MAILOUT_DELIVERY = "queue://" + __import__("os").environ["SPOOL"]
DEFAULT_FROM_EMAIL = "Shop <shop@origin.test>"
"""

TESTS = """
from django.core import mail
from django.test import SimpleTestCase

from twisted_mailout.contrib.django import EmailBackend
from twisted_mailout.testing import capture_mail


class Mail(SimpleTestCase):
    def test_outbox(self):
        mail.send_mail("Welcome", "Your account is ready.", None, ["zoe@dest.test"])
        self.assertEqual([m.subject for m in mail.outbox], ["Welcome"])
        print("OUTBOX", len(mail.outbox))

    def test_ours_beside_it(self):
        with capture_mail() as outbox:
            EmailBackend().send_messages(
                [mail.EmailMessage("Ours", "body", None, ["b@dest.test"])])
        outbox.assert_sent(1, to="b@dest.test", subject="Ours")
        self.assertEqual(mail.outbox, [])  # each test starts with an empty outbox
        print("CAPTURED", len(outbox))
"""

RUN = """
import os, sys, django
from django.conf import settings
from django.test.utils import get_runner
django.setup()
failures = get_runner(settings)(verbosity=2).run_tests(["tests_mail"])
sys.exit(bool(failures))
"""


def test_djangos_test_runner_gives_mail_outbox_and_our_capture_works_beside_it(tmp_path):
    (tmp_path / "settings.py").write_text(SETTINGS)
    (tmp_path / "tests_mail.py").write_text(TESTS)
    (tmp_path / "run.py").write_text(RUN)
    spool = tmp_path / "spool"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
           "DJANGO_SETTINGS_MODULE": "settings", "SPOOL": str(spool),
           "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, str(tmp_path / "run.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Ran 2 tests" in r.stderr and "OK" in r.stderr
    assert "OUTBOX 1" in r.stdout and "CAPTURED 1" in r.stdout
    # nothing reached the real queue: the runner's locmem and our capture took it all
    assert not (spool / "new").exists() or os.listdir(spool / "new") == []
