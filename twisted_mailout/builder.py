"""Old import path, kept for one release: use L{twisted_mailout.apps.builder}.

C{import twisted_mailout.builder} gives the very same module object as
C{twisted_mailout.apps.builder}, so names, isinstance checks and monkeypatching agree.
"""

import sys

from twisted_mailout.apps import builder as _module

sys.modules[__name__] = _module
