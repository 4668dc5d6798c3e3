"""shared.clock.derived_id is RFC 4122 uuid5 written out for speed: it must stay exactly uuid5."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from shared.clock import ID_NAMESPACE, derived_id

parts = st.lists(
    st.one_of(st.text(), st.integers(), st.floats(allow_nan=False), st.none()), min_size=1, max_size=5
)


@given(parts)
def test_derived_id_equals_uuid5_of_the_joined_parts(ps: list[object]) -> None:
    expected = uuid.uuid5(ID_NAMESPACE, "|".join(str(p) for p in ps)).hex
    assert derived_id(*ps) == expected


def test_derived_id_is_a_version_5_rfc4122_uuid() -> None:
    u = uuid.UUID(derived_id("candle", "BTC/USDC", 1_627_812_000))
    assert u.version == 5
    assert u.variant == uuid.RFC_4122
