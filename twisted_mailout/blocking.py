"""The blocking and futures API for programs without a reactor (Django,
Flask, scripts): C{twisted_mailout.blocking.send(...)} and C{.submit(...)}.

The documented entry point; C{import twisted_mailout.blocking} gives the very
same module object as L{twisted_mailout.apps.blocking}, where it is written
(so names, isinstance checks and monkeypatching agree).
"""

import sys

from twisted_mailout.apps import blocking as _module

sys.modules[__name__] = _module
