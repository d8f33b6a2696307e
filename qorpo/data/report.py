"""What happened to the rows of a dataset: kept, dropped (by reason, with the first row numbers),
truncated, and the token lengths — the table `qorpo train` prints before training."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
from rich.table import Table

FIRST_ROWS = 5  # row numbers shown per drop reason


class DropInfo(NamedTuple):
    count: int
    first_rows: list[int]


class LengthStats(NamedTuple):
    p50: int
    p90: int
    max: int

    @classmethod
    def of(cls, values: list[int]) -> LengthStats:
        if not values:
            return cls(0, 0, 0)
        p50, p90 = np.percentile(np.asarray(values), [50, 90])
        return cls(round(float(p50)), round(float(p90)), int(max(values)))

    def __str__(self) -> str:
        return f"p50 {self.p50} · p90 {self.p90} · max {self.max}"


@dataclass
class DataReport:
    """What happened to the rows of one dataset. Token lengths are of the kept pairs as
    trained (after truncation; responses and totals count both sides) except
    `untruncated_tokens`: prompt + response before truncation, over every tokenized row."""

    format: str
    rows_read: int
    rows_kept: int
    dropped: dict[str, DropInfo]
    prompt_tokens: LengthStats
    response_tokens: LengthStats
    total_tokens: LengthStats
    untruncated_tokens: LengthStats
    truncated_prompts: int = 0
    truncated_responses: int = 0
    source: str = ""

    def table(self) -> Table:
        title = f"data: {self.source} (format: {self.format})" if self.source else "data"
        table = Table(title=title, title_justify="left")
        table.add_column("")
        table.add_column("rows", justify="right")
        table.add_column("details")
        table.add_row("rows read", str(self.rows_read), "")
        table.add_row("rows kept", str(self.rows_kept), "")
        for reason, info in sorted(self.dropped.items(), key=lambda kv: -kv[1].count):
            rows = ", ".join(map(str, info.first_rows))
            more = ", …" if info.count > len(info.first_rows) else ""
            table.add_row(f"dropped: {reason}", str(info.count), f"rows {rows}{more}")
        table.add_row("prompts truncated (left)", str(self.truncated_prompts), "")
        table.add_row("pairs with a response truncated", str(self.truncated_responses), "")
        for name, stats in (("prompt tokens", self.prompt_tokens),
                            ("response tokens", self.response_tokens),
                            ("total tokens", self.total_tokens),
                            ("total before truncation", self.untruncated_tokens)):
            table.add_row(name, "", str(stats))
        return table

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dropped"] = {k: v._asdict() for k, v in self.dropped.items()}
        for key in ("prompt_tokens", "response_tokens", "total_tokens", "untruncated_tokens"):
            out[key] = getattr(self, key)._asdict()
        return out


@dataclass
class Tally:
    """Accumulates columns of kept pairs and the report numbers while a dataset is built."""

    dropped: dict[str, DropInfo] = field(default_factory=dict)
    columns: dict[str, list[Any]] = field(default_factory=lambda: {
        k: [] for k in ("row", "chosen_input_ids", "chosen_response_start",
                        "rejected_input_ids", "rejected_response_start", "length")})
    prompt: list[int] = field(default_factory=list)
    response: list[int] = field(default_factory=list)
    total: list[int] = field(default_factory=list)
    untruncated: list[int] = field(default_factory=list)
    truncated_prompts: int = 0
    truncated_responses: int = 0

    def drop(self, row: int, reason: str) -> None:
        count, first = self.dropped.get(reason, DropInfo(0, []))
        self.dropped[reason] = DropInfo(count + 1, first + [row] if len(first) < FIRST_ROWS
                                        else first)

    def report(self, fmt: str, rows_read: int, source: str) -> DataReport:
        return DataReport(fmt, rows_read, len(self.columns["row"]), self.dropped,
                          LengthStats.of(self.prompt), LengthStats.of(self.response),
                          LengthStats.of(self.total), LengthStats.of(self.untruncated),
                          self.truncated_prompts, self.truncated_responses, source)
