"""Integrations with web frameworks (C{twisted_mailout.apps.django})."""
