"""Queue administration: one set of operations over the queue-store interface.

The layer between the daemon and the layers below. L{QueueAdmin} offers
Postfix's and KumoMTA's operator actions (list, show, summary, hold,
release, delete, bounce, flush, requeue, suspend) over any L{IQueueStore};
the C{mailout queue} command calls it directly (on a stopped daemon's
folder, under the queue lock) or through the daemon's HTTP API (which calls
it with the running scheduler, so the schedule changes at once).

Modules: L{selector} (which messages an action applies to), L{views} (the
JSON rows of C{list --json}, C{show}, the C{qshape} summary), L{operations}
(L{QueueAdmin}).
"""

from twisted_mailout.admin.operations import ActionResult, AdminConflict, QueueAdmin
from twisted_mailout.admin.selector import Selector, SelectorError

__all__ = ["ActionResult", "AdminConflict", "QueueAdmin", "Selector", "SelectorError"]
