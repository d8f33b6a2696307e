"""Where preference pairs go in a micro-batch's rows: the one geometry of the three layouts
(qorpo.data.collate builds its tensors from it, qorpo.memory.plan its estimate). Plain Python:
importing it loads no torch, so the memory plan can place pairs it only knows the lengths of.

A pair is (P, C, R) tokens: prompt, chosen response, rejected response.

* ``padded``  chosen i on row i (``prompt|chosen``), rejected i on row B+i (``prompt|rejected``)
* ``shared``  pair i on row i: ``prompt|chosen|rejected``, the prompt once
* ``packed``  the shared sequences of several pairs in one row, first-fit decreasing by length
  into rows of a capacity (`choose_capacity`); padding only at a row's tail

Every row is `length` long: the longest row rounded up to `pad_to_multiple_of`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from qorpo.attention.cost import DEFAULT_ATTENTION_COST

LAYOUTS: tuple[str, ...] = ("padded", "shared", "packed")
# The collator rounds row lengths up to this: fewer distinct shapes to compile and allocate,
# and multiples of 8 suit tensor cores. The one place the number is written.
PAD_MULTIPLE = 8

Lengths = tuple[int, int, int]  # one pair's (prompt, chosen response, rejected response) tokens


class Seat(NamedTuple):
    """Where a run of tokens starts: its row and the column of its first token."""

    row: int
    start: int


class PairSeats(NamedTuple):
    """One pair's place: the chosen sequence reads `prompt` then `chosen`, the rejected sequence
    `rejected_prompt` then `rejected` (shared/packed: the same prompt). Segments: a token
    attends only within its segment (padded: one per row; shared/packed: one per pair)."""

    prompt: Seat
    chosen: Seat
    rejected_prompt: Seat
    rejected: Seat
    chosen_segment: int
    rejected_segment: int


class Placement(NamedTuple):
    """B pairs laid out as `layout` in `rows` rows of `length` positions."""

    layout: str
    rows: int  # R
    length: int  # L, padding included
    pairs: tuple[PairSeats, ...]  # pair i's seats
    input_tokens: int  # non-pad positions the model runs (padded: Σ 2P+C+R)
    unique_tokens: int  # Σ P+C+R: each prompt once; the same in every layout
    scored_tokens: int  # N: tokens the loss projects to the vocabulary
    sft_tokens: int  # tokens in the NLL

    @property
    def tokens(self) -> int:
        """Positions run through every layer (padding included: it is computed too)."""
        return self.rows * self.length

    @property
    def pad_tokens(self) -> int:
        return self.tokens - self.input_tokens


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: pair indices per row, every row's total ≤ capacity. Longest first
    is what makes first-fit pack well; ties keep input order, so the result is deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def choose_capacity(lengths: list[int], multiple: int = PAD_MULTIPLE,
                    attention_cost: float = DEFAULT_ATTENTION_COST) -> int:
    """The row capacity that lays `lengths` out cheapest: rows x L (padding included, every
    row is L long) times the attention term, over capacities from the longest pair to twice
    it (longer rows cost more in attention than the padding they save)."""
    longest = max(lengths)
    best, best_cost = longest, float("inf")
    for cap in sorted({min(2 * longest, longest + n) for n in [0, *lengths]}):
        rows = pack_rows(lengths, cap)
        length = round_up(max(sum(lengths[i] for i in r) for r in rows), multiple)
        cost = len(rows) * length * (1 + length * attention_cost)
        if cost < best_cost:
            best, best_cost = cap, cost
    return best


def place(lengths: Sequence[Lengths], layout: str = "padded", *, sft_on_prompt: bool = False,
          max_row_tokens: int | None = None, pad_to_multiple_of: int = 1,
          attention_cost: float = DEFAULT_ATTENTION_COST) -> Placement:
    """Lay out pairs of these (P, C, R) lengths as `layout`.

    max_row_tokens: packed only, the row capacity; default: `choose_capacity` for a model whose
    `attention_cost` is given (qorpo.attention.cost). A pair longer than it is a ValueError.
    Scored: every response token of both sides; with `sft_on_prompt` also the chosen
    sequence's prompt tokens after the first (NLL only)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not lengths:
        raise ValueError("no pairs to lay out")
    multiple = max(1, int(pad_to_multiple_of))
    if layout == "padded":
        seats = _padded_seats(lengths)
        used = [p + c for p, c, _ in lengths] + [p + r for p, _, r in lengths]
    else:
        shared = [p + c + r for p, c, r in lengths]
        row_pairs = ([[i] for i in range(len(lengths))] if layout == "shared"
                     else _packed_rows(shared, max_row_tokens, multiple, attention_cost))
        seats, used = _shared_seats(lengths, row_pairs)
    sft = sum(c + (max(0, p - 1) if sft_on_prompt else 0) for p, c, _ in lengths)
    return Placement(layout, len(used), round_up(max(used), multiple), tuple(seats),
                     input_tokens=sum(used), unique_tokens=sum(map(sum, lengths)),
                     scored_tokens=sft + sum(r for _, _, r in lengths), sft_tokens=sft)


def _padded_seats(lengths: Sequence[Lengths]) -> list[PairSeats]:
    b = len(lengths)
    return [PairSeats(Seat(i, 0), Seat(i, p), Seat(b + i, 0), Seat(b + i, p), i, b + i)
            for i, (p, _, _) in enumerate(lengths)]


def _packed_rows(shared: list[int], max_row_tokens: int | None, multiple: int,
                 attention_cost: float) -> list[list[int]]:
    capacity = (choose_capacity(shared, multiple, attention_cost) if max_row_tokens is None
                else int(max_row_tokens))
    if max(shared) > capacity:
        raise ValueError(f"a pair has {max(shared)} tokens (prompt + both responses), more "
                         f"than max_row_tokens={capacity}")
    return pack_rows(shared, capacity)


def _shared_seats(lengths: Sequence[Lengths],
                  row_pairs: list[list[int]]) -> tuple[list[PairSeats], list[int]]:
    """Pair i → its row, prompt|chosen|rejected contiguous from its offset; tokens per row."""
    seats: list[PairSeats] = [None] * len(lengths)  # type: ignore[list-item]
    used: list[int] = []
    for row, members in enumerate(row_pairs):
        offset = 0
        for i in members:
            p, c, r = lengths[i]
            prompt = Seat(row, offset)
            seats[i] = PairSeats(prompt, Seat(row, offset + p), prompt,
                                 Seat(row, offset + p + c), i, i)
            offset += p + c + r
        used.append(offset)
    return seats, used
