"""The Django settings every test module that uses Django shares (Django
can be configured once per process, so they must agree)."""

from __future__ import annotations


def configure() -> None:
    """Configure Django for the tests (once): the documented backend path,
    C{null://} delivery by default (each test overrides C{MAILOUT_DELIVERY}),
    an in-memory SQLite database for C{transaction.on_commit}."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        EMAIL_BACKEND="twisted_mailout.contrib.django.EmailBackend",
        MAILOUT_DELIVERY="null://",
        DEFAULT_FROM_EMAIL="Shop <shop@origin.test>",
        INSTALLED_APPS=[],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        USE_TZ=True,
    )
    django.setup()
