"""The Django backend on a PostgreSQL queue in the site's own database
(issue 13 item 2): with MAILOUT_DELIVERY = "django-db:ALIAS", mail sent
inside transaction.atomic() is queued only when the block commits; a
rollback leaves no mail; in autocommit mode it is committed at once. What it
writes is what a daemon picks up."""

from __future__ import annotations

import pytest

from tests.support.django_settings import configure
from twisted_mailout.queue.postgres import PostgresStore, upgrade


@pytest.fixture
def alias(pg_uri):
    configure()
    from django.db import connections
    from psycopg.conninfo import conninfo_to_dict

    upgrade(pg_uri)
    p = conninfo_to_dict(pg_uri)
    name = f"mailq_{p['dbname']}"
    # a second database for this test, with Django's defaults filled in
    connections.settings[name] = connections.configure_settings({
        "default": connections.settings["default"],
        name: {"ENGINE": "django.db.backends.postgresql", "NAME": p["dbname"],
               "HOST": p["host"], "PORT": str(p.get("port", "")), "USER": p["user"]}})[name]
    yield name
    connections[name].close()
    del connections.settings[name]


def queued(pg_uri):
    store = PostgresStore(pg_uri)
    try:
        return {x.entry.recipients[0].address: x for x in store.list_entries()}
    finally:
        store.close()


def test_mail_inside_atomic_is_queued_only_when_the_block_commits(alias, pg_uri):
    from django.core.mail import EmailMessage, get_connection
    from django.db import transaction

    backend = get_connection("twisted_mailout.apps.django.EmailBackend",
                             delivery=f"django-db:{alias}")

    def mail(to):
        return EmailMessage("Your order", "Thank you.", "Shop <shop@origin.test>", [to],
                            bcc=["audit@origin.test"], connection=backend)

    with transaction.atomic(using=alias):
        assert mail("kept@dest.test").send() == 1
        assert queued(pg_uri) == {}  # not visible before the commit
    with pytest.raises(RuntimeError):
        with transaction.atomic(using=alias):
            mail("rolled-back@dest.test").send()
            raise RuntimeError("the order failed")
    assert mail("autocommit@dest.test").send() == 1  # outside atomic: at once
    got = queued(pg_uri)
    assert set(got) == {"kept@dest.test", "autocommit@dest.test"}
    entry = got["kept@dest.test"].entry
    assert entry.sender == "shop@origin.test"
    assert [r.address for r in entry.recipients] == ["kept@dest.test", "audit@origin.test"]
    assert got["kept@dest.test"].where == "incoming"


def test_an_unknown_alias_is_a_configuration_error(alias):
    from django.core.exceptions import ImproperlyConfigured
    from django.core.mail import get_connection

    with pytest.raises(ImproperlyConfigured, match="no database 'nowhere'"):
        get_connection("twisted_mailout.apps.django.EmailBackend", delivery="django-db:nowhere")
