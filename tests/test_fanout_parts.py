"""How a catalog fan-out is cut into parts for the workers (`rulesvc.core.catalog.part_ends` and
`fanout_ranges`), without mongod: every interest falls in exactly one part, judged by comparing ids in the
test."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from rulesvc.core.catalog import MOST_PARTS, PART_BATCHES, fanout_ranges, part_ends

ids_strategy = st.lists(st.text("abc|0123", min_size=1, max_size=6), max_size=400, unique=True).map(sorted)


def fanout_parts(
    ids: list[str], after: str | None, batch: int, most: int = MOST_PARTS
) -> list[tuple[str | None, str | None]]:
    """The cut the fan-out makes: the ids at `part_ends` picked as the store's one pass picks them."""
    return fanout_ranges(after, [ids[at] for at in part_ends(len(ids), batch, most)])


def part_of(key: str, parts: list[tuple[str | None, str | None]]) -> list[int]:
    return [
        n
        for n, (after, upto) in enumerate(parts)
        if (after is None or key > after) and (upto is None or key <= upto)
    ]


@given(ids_strategy, st.integers(1, 40), st.integers(1, 20))
def test_every_interest_falls_in_exactly_one_part(ids: list[str], batch: int, most: int) -> None:
    parts = fanout_parts(ids, None, batch, most)
    assert 1 <= len(parts) <= min(most, max(1, len(ids) // (PART_BATCHES * batch)))
    assert parts[0][0] is None and parts[-1][1] is None
    placed = [part_of(key, parts) for key in ids]
    assert all(len(p) == 1 for p in placed)
    sizes = [sum(1 for p in placed if p == [n]) for n in range(len(parts))]
    if ids:  # as even as whole ids allow, none empty
        assert min(sizes) > 0 and max(sizes) - min(sizes) <= 1
    # An interest added later, anywhere in the index, falls in one part too.
    assert all(len(part_of(key, parts)) == 1 for key in ["", "a", "zzz", *(i + "0" for i in ids)])


@given(ids_strategy)
def test_a_fanout_cut_after_a_position_starts_there(ids: list[str]) -> None:
    after = "a"
    later = [i for i in ids if i > after]
    parts = fanout_parts(later, after, 1)
    assert parts[0][0] == after and not part_of(after, parts)


def test_a_large_fanout_gets_at_most_the_most_parts_and_a_small_one_one() -> None:
    ids = [f"c{i:06d}|p" for i in range(100_000)]
    assert len(fanout_parts(ids, None, 1000)) == MOST_PARTS
    assert len(fanout_parts(ids[:30_000], None, 1000)) == 7
    assert fanout_parts(ids[:3999], None, 1000) == [(None, None)]


def test_small_batches_cut_every_id_into_a_part() -> None:
    # 29 contacts in batches of one: seven parts of four or five, none past the last id.
    ids = [f"c{i:02d}" for i in range(29)]
    parts = fanout_parts(ids, None, 1)
    assert len(parts) == 7
    assert sorted(len([k for k in ids if part_of(k, parts) == [n]]) for n in range(7)) == [4] * 6 + [5]


@given(st.integers(0, 5_000_000), st.integers(1, 2000), st.integers(1, 64))
def test_part_ends_are_increasing_positions_inside_the_interests(
    interested: int, batch: int, most: int
) -> None:
    # The store reads the index once and keeps the ids at these positions: they must come in order, each
    # once, and each an interest that exists (an end past the last would leave a part out).
    ends = part_ends(interested, batch, most)
    assert len(ends) < max(1, most)
    assert all(0 <= a < b < interested for a, b in pairwise(ends))
    assert all(0 <= at < interested for at in ends)
