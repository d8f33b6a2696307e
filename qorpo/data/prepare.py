"""From a config to training-ready pairs: load, convert, tokenize, apply the length policy,
split off eval rows, and report what happened (see docs/data.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import datasets
import numpy as np

from qorpo.data.encode import Encoder, setup_chat_template, warn_template
from qorpo.data.formats import (
    DROP_IDENTICAL_TRUNCATED,
    DROP_PROMPT_TOO_LONG,
    DROP_TEMPLATE,
    DropRow,
    Pair,
    detect_format,
    to_messages,
)
from qorpo.data.report import DataReport, Tally
from qorpo.data.sources import load_rows
from qorpo.errors import DataError

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedTokenizerBase

    from qorpo.config import TrainConfig

_CHUNK = 1024  # pairs rendered/tokenized per batched tokenizer call


class PreparedData(NamedTuple):
    train: datasets.Dataset
    eval: datasets.Dataset | None
    format: str
    train_report: DataReport
    eval_report: DataReport | None
    chat_template: str


class _Fitted(NamedTuple):
    prompt: list[int]
    chosen: list[int]  # response ids only
    rejected: list[int]
    prompt_cut: bool
    response_cut: bool


def _fit(p_ids: list[int], rc: list[int], rr: list[int], cfg: TrainConfig,
         bos: int | None) -> _Fitted:
    """Apply the length policy: the (possibly shortened) prompt and responses; raises DropRow."""
    keep = cfg.resolved_max_prompt_length
    prompt_cut = len(p_ids) > keep
    if prompt_cut:  # keep the END of the prompt (the last turns) and the BOS
        head = p_ids[:1] if bos is not None and p_ids[0] == bos and keep > 1 else []
        p_ids = head + p_ids[len(p_ids) - (keep - len(head)):]
    room = cfg.max_length - len(p_ids)
    if room < max(1, cfg.min_response_tokens):
        raise DropRow(DROP_PROMPT_TOO_LONG)
    response_cut = len(rc) > room or len(rr) > room
    if response_cut:
        # Cut from the end: the end-of-turn token goes too, so no stop is learned mid-thought.
        rc, rr = rc[:room], rr[:room]
        if rc == rr:
            raise DropRow(DROP_IDENTICAL_TRUNCATED)
    return _Fitted(p_ids, rc, rr, prompt_cut, response_cut)


def _build(rows: datasets.Dataset, indices: list[int], fmt: str, cfg: TrainConfig,
           enc: Encoder, source: str) -> tuple[datasets.Dataset | None, DataReport]:
    tally = Tally()
    bos = enc.tok.bos_token_id
    for start in range(0, len(indices), _CHUNK):
        chunk = indices[start:start + _CHUNK]
        batch = rows[chunk]
        pairs: list[tuple[int, Pair]] = []
        for j, row in enumerate(chunk):
            try:
                pairs.append((row, to_messages({k: v[j] for k, v in batch.items()}, fmt,
                                               cfg.columns)))
            except DropRow as drop:
                tally.drop(row, drop.reason)
        for (row, _), res in zip(pairs, enc.encode([p for _, p in pairs]), strict=True):
            if isinstance(res, DropRow):
                tally.drop(row, res.reason)
                continue
            p_ids, rc, rr = res
            tally.untruncated += [len(p_ids) + len(rc), len(p_ids) + len(rr)]
            try:
                _keep(tally, row, _fit(p_ids, rc, rr, cfg, bos))
            except DropRow as drop:
                tally.drop(row, drop.reason)
    report = tally.report(fmt, len(indices), source)
    return (_to_dataset(tally.columns) if report.rows_kept else None), report


def _to_dataset(columns: dict[str, list[Any]]) -> datasets.Dataset:
    """Arrow table built from numpy buffers: much faster than from_dict on lists of lists."""
    import pyarrow as pa
    from datasets.table import InMemoryTable

    arrays = {}
    for name, values in columns.items():
        if name.endswith("_input_ids"):
            offsets = np.zeros(len(values) + 1, dtype=np.int64)
            np.cumsum([len(v) for v in values], out=offsets[1:])
            flat = np.concatenate([np.asarray(v, dtype=np.int32) for v in values])
            arrays[name] = pa.LargeListArray.from_arrays(offsets, flat)
        else:
            arrays[name] = pa.array(np.asarray(values, dtype=np.int64))
    return datasets.Dataset(InMemoryTable(pa.table(arrays)))


def _keep(tally: Tally, row: int, fitted: _Fitted) -> None:
    p_ids, rc, rr = fitted.prompt, fitted.chosen, fitted.rejected
    chosen, rejected = p_ids + rc, p_ids + rr
    tally.truncated_prompts += fitted.prompt_cut
    tally.truncated_responses += fitted.response_cut
    cols = tally.columns
    cols["row"].append(row)
    cols["chosen_input_ids"].append(chosen)
    cols["rejected_input_ids"].append(rejected)
    cols["chosen_response_start"].append(len(p_ids))
    cols["rejected_response_start"].append(len(p_ids))
    cols["length"].append(max(len(chosen), len(rejected)))
    tally.prompt.append(len(p_ids))
    tally.response += [len(rc), len(rr)]
    tally.total += [len(chosen), len(rejected)]


def prepare_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase,
                 console: Console | None = None) -> PreparedData:
    """Load, convert, tokenize and report the train (and eval) preference pairs of `cfg`."""
    own = getattr(tokenizer, "chat_template", None)
    template = setup_chat_template(tokenizer, cfg.chat_template)
    enc = Encoder(tokenizer, template)
    if console is not None:
        origin = ("--chat-template" if cfg.chat_template else "the tokenizer's own"
                  if own and template == own else "qorpo's ChatML default (tokenizer has none)")
        console.print(f"[bold]chat template[/]: {origin}")
    warn_template(enc, console)
    if cfg.data is None:
        raise DataError("no --data given; pass --data FILE or a hub dataset name.")
    source = cfg.data
    rows = load_rows(source, split=cfg.split, subset=cfg.subset,
                     trust_remote_code=cfg.trust_remote_code)
    train_idx, eval_idx = list(range(len(rows))), []
    eval_rows, eval_source = None, ""
    if cfg.eval_data:
        same = cfg.eval_data == source
        eval_rows = load_rows(cfg.eval_data, split=cfg.eval_split or cfg.split,
                              subset=cfg.subset if same else None,
                              trust_remote_code=cfg.trust_remote_code)
        eval_source = cfg.eval_data
    elif cfg.eval_split:
        if Path(source).expanduser().is_file():
            raise DataError(f"--eval-split applies to hub datasets; {source} is a local file. "
                            "Use --eval-data FILE or --eval-fraction instead.")
        eval_rows = load_rows(source, split=cfg.eval_split, subset=cfg.subset,
                              trust_remote_code=cfg.trust_remote_code)
        eval_source = f"{source} [{cfg.eval_split}]"
    elif cfg.eval_fraction > 0:
        used = len(rows)
        if cfg.max_samples is not None:  # hold eval out of the rows the cap draws from
            used = min(used, math.ceil(cfg.max_samples / (1 - cfg.eval_fraction)))
        train_idx, eval_idx = split_indices(used, cfg.eval_fraction, cfg.seed)
        eval_rows, eval_source = rows, f"{source} (eval fraction {cfg.eval_fraction:g})"
    if cfg.max_samples is not None:
        train_idx = train_idx[:cfg.max_samples]
    train, train_report = _prepare_one(rows, train_idx, cfg, enc, source, console)
    ev, ev_report = None, None
    if eval_rows is not None:
        idx = eval_idx or list(range(len(eval_rows)))
        ev, ev_report = _prepare_one(eval_rows, idx, cfg, enc, eval_source, console)
    return PreparedData(train, ev, train_report.format, train_report, ev_report, template)


def _prepare_one(rows: datasets.Dataset, idx: list[int], cfg: TrainConfig, enc: Encoder,
                 source: str, console: Console | None) -> tuple[datasets.Dataset, DataReport]:
    fmt = detect_format(rows.column_names, _first_usable(rows), cfg.columns, source)
    how = "from --columns" if fmt == "columns" else "detected"
    if console is not None:
        console.print(f"[bold]data[/]: {source} → format [cyan]{fmt}[/] ({how}), "
                      f"{len(idx)} rows")
    data, report = _build(rows, idx, fmt, cfg, enc, source)
    if console is not None:
        console.print(report.table())
    if data is None:
        raise DataError(_nothing_left(report, cfg))
    return data, report


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) row indices, both in file order; at least one row each."""
    if n < 2:
        raise DataError(f"--eval-fraction needs at least 2 rows, the data has {n}")
    n_eval = min(n - 1, max(1, round(n * fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    held = set(perm[:n_eval].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def _first_usable(rows: datasets.Dataset) -> dict[str, Any]:
    """First row (of the first 100) with a chosen value: its types tell the format apart."""
    head = rows[: min(100, len(rows))]
    for j in range(len(next(iter(head.values()), []))):
        row = {k: v[j] for k, v in head.items()}
        if row.get("chosen") is not None:
            return row
    return {k: v[0] for k, v in head.items()} if head else {}


_ADVICE = {
    DROP_PROMPT_TOO_LONG: "raise --max-length, or lower --max-prompt-length / "
                          "--min-response-tokens",
    DROP_IDENTICAL_TRUNCATED: "raise --max-length (both responses start alike)",
    DROP_TEMPLATE: "pass a chat template that renders these conversations (--chat-template)",
}


def _nothing_left(report: DataReport, cfg: TrainConfig) -> str:
    lines = [f"no usable preference pairs in {report.source} ({report.rows_read} rows read, "
             f"format {report.format}, max_length {cfg.max_length}, max_prompt_length "
             f"{cfg.resolved_max_prompt_length}, min_response_tokens {cfg.min_response_tokens}):"]
    for reason, info in report.dropped.items():
        advice = _ADVICE.get(reason, "check the columns (--columns) and the data")
        lines.append(f"  {reason}: {info.count} rows (e.g. rows {info.first_rows}) -> {advice}")
    return "\n".join(lines)
