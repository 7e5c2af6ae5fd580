"""Integrations with web frameworks (C{twisted_mailout.contrib.django})."""
