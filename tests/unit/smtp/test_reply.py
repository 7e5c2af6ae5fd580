"""Reply's classification (review F2): is_transient is 4xx only."""

from __future__ import annotations

import pytest

from twisted_mailout.envelope import Reply


@pytest.mark.parametrize(("code", "positive", "intermediate", "transient", "permanent"), [
    (150, False, False, False, False),
    (220, True, False, False, False),
    (250, True, False, False, False),
    (334, False, True, False, False),
    (354, False, True, False, False),
    (421, False, False, True, False),
    (451, False, False, True, False),
    (550, False, False, False, True),
    (554, False, False, False, True),
])
def test_classes_are_disjoint(code, positive, intermediate, transient, permanent):
    r = Reply(code, "x")
    assert (r.is_positive, r.is_intermediate, r.is_transient, r.is_permanent) == \
        (positive, intermediate, transient, permanent)


def test_3xx_is_not_a_deferral():
    # Before: "not 2xx and not 5xx", so a 3xx to RCPT was taken as a deferral.
    assert not Reply(354, "go").is_transient
    assert not Reply(334, "challenge").is_transient
