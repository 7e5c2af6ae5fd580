"""The documented Django backend path (C{EMAIL_BACKEND =
"twisted_mailout.contrib.django.EmailBackend"}); the code lives in
L{twisted_mailout.apps.django}. This is the same module object.
"""

import sys

from twisted_mailout.apps import django as _module

sys.modules[__name__] = _module
