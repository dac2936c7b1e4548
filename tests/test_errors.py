"""The user-facing error: its line, and the problem and remedy a caller with a better remedy can take apart."""

from __future__ import annotations

import pickle

import pytest

from radtrt.errors import RadtrtError, fail


def test_a_remedy_given_apart_ends_the_line_and_can_be_left_out() -> None:
    with pytest.raises(RadtrtError) as info:
        fail("bundle b is damaged (x)", remedy="re-export the bundle")
    assert str(info.value) == "bundle b is damaged (x): re-export the bundle"
    assert (info.value.problem, info.value.remedy) == ("bundle b is damaged (x)", "re-export the bundle")
    with pytest.raises(RadtrtError) as plain:
        fail("no such study")
    assert str(plain.value) == plain.value.problem == "no such study" and plain.value.remedy is None
    # DataLoader workers send errors back pickled: the line survives
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
