"""Old import path, kept for one release: use L{twisted_mailout.apps.mailer}.

C{import twisted_mailout.mailer} gives the very same module object as
C{twisted_mailout.apps.mailer}, so names, isinstance checks and monkeypatching agree.
"""

import sys

from twisted_mailout.apps import mailer as _module

sys.modules[__name__] = _module
