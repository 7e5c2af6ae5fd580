"""The C{mailout queue} command on a PostgreSQL queue that many daemons share
(docs/postgresql.md): L{SharedBackend}.

Reading (list, show, summary, suspensions) needs nobody's leave. An action on
messages (hold, release, delete, bounce, flush, requeue) first gets the
messages into this command's hands: it claims those no live daemon holds,
asks each daemon holding others to give them back (C{mailout.admin_request}
and a NOTIFY; the daemon lets work in flight on them finish, then releases
them), waits for the answers (bounded), claims those too, acts on what it
holds with the same L{QueueAdmin} code as on a folder, and releases them, so
that any daemon takes them up again. A message still held elsewhere when the
wait ends is reported as skipped, never changed behind its daemon's back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted_mailout.daemon.queueback import OfflineBackend

if TYPE_CHECKING:
    from twisted_mailout.admin import Selector

__all__ = ["SharedBackend"]


class SharedBackend(OfflineBackend):
    """L{OfflineBackend} over a L{PostgresStore} shared with running daemons.

    @param store: the L{PostgresStore}, acting for this command's own owner.
    @param wait: seconds to wait for the daemons to give messages back.
    """

    def __init__(self, store: Any, wait: float = 30.0) -> None:
        super().__init__(store)
        self.wait = wait

    def _gather(self, qids: list[str]) -> tuple[list[str], dict[str, str]]:
        """Get C{qids} into this command's hands.

        @return: C{(held here, {queue id: why not})}.
        """
        store = self.store
        seized, held = store.seize(qids)
        if held:
            asked = [store.ask_release(owner, q) for owner, q in held.items()]
            deadline = time.monotonic() + self.wait
            while asked and time.monotonic() < deadline:
                asked = [rid for rid in asked if not store.request_done(rid)]
                if asked:
                    time.sleep(0.1)
            more, still = store.seize([q for qs in held.values() for q in qs])
            seized += more
            held = still
        why = {q: f"held by the daemon {owner}, which did not give it back in "
                  f"{self.wait:g}s" for owner, qs in held.items() for q in qs}
        return seized, why

    def act(self, action: str, selector: Selector, reason: str,
            progress: Callable[[int, int], object] | None) -> dict[str, Any]:
        """See L{Backend.act}: on the messages gathered (module docstring)."""
        from twisted_mailout.admin import Selector

        if action != "flush":
            selector.require(action)
        chosen = Selector(all=True) if action == "flush" and selector.is_empty else selector
        admin = self._get_admin()
        qids = [r["queue_id"] for r in admin.iter_rows(chosen, self.clock.seconds())]
        seized, skipped = self._gather(qids)
        try:
            if not seized:
                result: dict[str, Any] = {"action": action, "matched": len(qids),
                                          "changed": 0, "queue_ids": [], "skipped": {},
                                          "dsn_queue_ids": []}
            else:
                result = super().act(action, Selector(ids=tuple(sorted(seized))), reason,
                                     progress)
                result["matched"] = len(qids)
        finally:
            self.store.release(seized)  # (removed ones are gone; the rest go back)
        result["skipped"] = {**result.get("skipped", {}), **skipped}
        return result


    def close(self) -> None:
        """Close the database connection."""
        super().close()
        self.store.close()
