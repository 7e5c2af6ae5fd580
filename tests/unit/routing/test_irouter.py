"""Both routers provide IRouter, the contract the connector relies on."""

from __future__ import annotations

from twisted.internet import task
from zope.interface.verify import verifyObject

from twisted_mailout.routing.router import IRouter, MXRouter, RelayRouter


def test_mx_router_provides_irouter() -> None:
    router = MXRouter(None, task.Clock())
    assert verifyObject(IRouter, router)
    assert (router.relay, router.implicit_tls, router.name) == (False, False, None)


def test_relay_router_provides_irouter() -> None:
    router = RelayRouter("relay.example.net", 465, None, task.Clock(), implicit_tls=True,
                         name="smtps://relay.example.net")
    assert verifyObject(IRouter, router)
    assert (router.relay, router.implicit_tls, router.name) == (
        True, True, "smtps://relay.example.net")
