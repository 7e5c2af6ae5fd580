"""Old import path, kept for one release: use L{twisted_mailout.apps.txn}.

C{import twisted_mailout.txn} gives the very same module object as
C{twisted_mailout.apps.txn}, so names, isinstance checks and monkeypatching agree.
"""

import sys

from twisted_mailout.apps import txn as _module

sys.modules[__name__] = _module
