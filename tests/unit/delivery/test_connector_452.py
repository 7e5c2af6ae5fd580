"""RFC 5321 4.5.3.1.10: recipients refused with "452 too many recipients"
while others were accepted are sent at once in further transactions, over
the same connection (the pool hands it back between transactions)."""

from __future__ import annotations

import io
from typing import Any

from twisted.internet import defer

from tests.unit.delivery.test_connector_cancel import MSG, PeerTestCase


class ContinuationTests(PeerTestCase):
    @defer.inlineCallbacks
    def test_452_sends_the_rest_in_new_transactions_on_the_same_connection(self) -> Any:
        factory, connector = self.start({})
        factory.rcpt_limit = 2
        rcpts = [f"u{i}@a.test" for i in range(5)]
        attempt = yield connector.deliver("a.test", "s@origin.test", rcpts,
                                          lambda: io.BytesIO(MSG), len(MSG))
        self.assertEqual({r: attempt.replies[r].code for r in rcpts}, dict.fromkeys(rcpts, 250))
        self.assertEqual(factory.messages, [1, 1, 1])  # three transactions, one connection
        self.assertEqual(sorted(r for _, r in factory.recipients), [f"<{r}>" for r in rcpts])
        self.assertEqual(len(factory.connections), 1)

    @defer.inlineCallbacks
    def test_452_for_every_recipient_is_a_deferral_not_a_loop(self) -> Any:
        factory, connector = self.start({})
        factory.rcpt_limit = 0
        attempt = yield connector.deliver("a.test", "s@origin.test", ["u@a.test", "v@a.test"],
                                          lambda: io.BytesIO(MSG), len(MSG))
        self.assertEqual([r.code for r in attempt.replies.values()], [452, 452])
        self.assertEqual(factory.messages, [])
