"""Old import path, kept for one release: use L{twisted_mailout.apps.deliveries}.

C{import twisted_mailout.deliveries} gives the very same module object as
C{twisted_mailout.apps.deliveries}, so names, isinstance checks and monkeypatching agree.
"""

import sys

from twisted_mailout.apps import deliveries as _module

sys.modules[__name__] = _module
