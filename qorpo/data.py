"""Preference data: load, detect the format, render with the chat template, tokenize, report.

Token layout of one example (both sides share the prompt ids):

    [BOS?] prompt (rendered with add_generation_prompt=True) | response ... end-of-turn
    ^0                                                         ^response_start          ^len

The response is scored up to and including the template's end-of-turn/EOS token; whitespace the
template writes after it (ChatML's "\\n") is dropped. See docs/data.md for the policy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import datasets
import numpy as np
import torch
from rich.table import Table

from qorpo.formats import (
    DROP_IDENTICAL_TRUNCATED,
    DROP_PROMPT_TOO_LONG,
    DROP_TEMPLATE,
    DataError,
    DropRow,
    Pair,
    detect_format,
    load_rows,
    to_messages,
)

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedTokenizerBase

    from qorpo.config import TrainConfig

__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "DataError", "DataReport", "DropInfo", "DropRow", "LengthStats",
    "Pair", "PairCollator", "PreparedData", "detect_format", "load_rows", "prepare_data",
    "setup_chat_template", "to_messages",
]

# ChatML-style default for tokenizers without a template (base models). BOS: written when the
# caller passes add_bos_token=True/False, else when the tokenizer has a BOS distinct from EOS
# (Llama/Mistral/Gemma want one; GPT-2-style models, whose bos == eos, and Qwen, with none, don't).
# Every turn ends with the tokenizer's EOS so the model learns to stop where `generate` stops.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if add_bos_token is defined -%}{%- set _bos = add_bos_token -%}"
    "{%- else -%}{%- set _bos = bos_token is defined and bos_token"
    " and bos_token != eos_token -%}{%- endif -%}"
    "{%- if _bos -%}{{ bos_token }}{%- endif -%}"
    "{%- set _eos = eos_token if eos_token is defined and eos_token else '<|im_end|>' -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + _eos + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
_CHUNK = 1024  # pairs rendered/tokenized per batched tokenizer call
_FIRST_ROWS = 5


# ----------------------------------------------------------------------------- chat template
def setup_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> str:
    """Set tokenizer.chat_template: the user's (path or text) > the tokenizer's own > default."""
    if chat_template:
        template = _read_template(chat_template)
    else:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # named templates: the default one renders plain chats
            own = own.get("default")
        template = own or DEFAULT_CHAT_TEMPLATE
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "ping"}], tokenize=False,
                                      add_generation_prompt=True, chat_template=template)
    except Exception as exc:  # any template may raise anything (raise_exception, bad syntax)
        raise DataError(f"the chat template does not render a one-message chat: {exc}. "
                        "Pass a working one with --chat-template FILE.") from exc
    tokenizer.chat_template = template
    return template


def _read_template(value: str) -> str:
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(f"chat template file not found: {value}. Pass a Jinja file path or "
                        "the template text itself.")
    return path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- report
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


class PreparedData(NamedTuple):
    train: datasets.Dataset
    eval: datasets.Dataset | None
    format: str
    train_report: DataReport
    eval_report: DataReport | None
    chat_template: str


@dataclass
class _Tally:
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
        self.dropped[reason] = DropInfo(count + 1, first + [row] if len(first) < _FIRST_ROWS
                                        else first)

    def report(self, fmt: str, rows_read: int, source: str) -> DataReport:
        return DataReport(fmt, rows_read, len(self.columns["row"]), self.dropped,
                          LengthStats.of(self.prompt), LengthStats.of(self.response),
                          LengthStats.of(self.total), LengthStats.of(self.untruncated),
                          self.truncated_prompts, self.truncated_responses, source)


# ----------------------------------------------------------------------------- tokenizing
class _Encoder:
    """Renders pairs with the chat template and tokenizes them in batches."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has no eos_token; set one so responses can end")
        self.tok = tokenizer
        self.template = template
        self.eos = tokenizer.eos_token
        self.bos_prefix = _added_prefix(tokenizer)
        not_enders = {tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token} - {self.eos}
        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        self.enders = tuple((specials | {self.eos}) - not_enders)
        # Control tokens the template writes, plus BOS/EOS (passed to it as variables).
        written = {t for t in specials if t in template} | {self.eos, tokenizer.bos_token}
        self.anchors = tuple(t for t in written if t)

    def render(self, convs: list[list[dict[str, str]]], gen: bool) -> list[str | None]:
        kw = {"tokenize": False, "add_generation_prompt": gen, "chat_template": self.template}
        try:
            return list(self.tok.apply_chat_template(convs, **kw))
        except Exception:  # one bad row spoils the batch: redo it row by row to find it
            out: list[str | None] = []
            for conv in convs:
                try:
                    out.append(self.tok.apply_chat_template(conv, **kw))
                except Exception:
                    out.append(None)
            return out

    def close(self, prompt: str | None, full: str | None) -> str | None:
        """The response text after `prompt`, ending with exactly one end-of-turn token."""
        if prompt is None or full is None or not full.startswith(prompt):
            return None  # the template raised, or renders the prompt differently in context
        text = full[len(prompt):].rstrip()  # trailing whitespace after end-of-turn: not scored
        return text if text.endswith(self.enders) else text + self.eos

    def ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]

    def tail(self, prompt: str) -> str:
        """The prompt from its last control token on. Tokenizers split on special tokens
        first, so this tail tokenizes as it does inside the prompt: tokenizing tail + response
        instead of prompt + response saves re-tokenizing long prompts twice per pair."""
        start = max((prompt.rfind(t) for t in self.anchors), default=-1)
        return prompt[start:] if start > 0 else prompt

    def encode(self, pairs: list[Pair]) -> list[tuple[list[int], list[int], list[int]] | str]:
        """(prompt ids, chosen response ids, rejected response ids) per pair, or a drop reason."""
        prompts = self.render([p.prompt for p in pairs], gen=True)
        sides = [self.render([[*p.prompt, {"role": "assistant", "content": getattr(p, side)}]
                              for p in pairs], gen=False) for side in ("chosen", "rejected")]
        resp = [[self.close(p, f) for p, f in zip(prompts, full, strict=True)] for full in sides]
        ok = [i for i in range(len(pairs)) if resp[0][i] is not None and resp[1][i] is not None]
        tails = [self.tail(prompts[i]) for i in ok]
        n = len(ok)
        flat = self.ids([prompts[i] for i in ok] + tails
                        + [tails[k] + resp[s][i] for s in (0, 1) for k, i in enumerate(ok)])
        out: list[Any] = [DROP_TEMPLATE] * len(pairs)
        redo: list[tuple[int, int]] = []  # (pair index, side) needing the slow path
        for k, i in enumerate(ok):
            p_ids, t_ids = flat[k], flat[n + k]
            fits = len(t_ids) <= len(p_ids) and p_ids[len(p_ids) - len(t_ids):] == t_ids
            out[i] = [p_ids, None, None]
            for s in (0, 1):
                joint = flat[n * (s + 2) + k]
                if fits and joint[:len(t_ids)] == t_ids:
                    out[i][s + 1] = joint[len(t_ids):]
                else:
                    redo.append((i, s))
        slow = self._slow([(out[i][0], prompts[i], resp[s][i]) for i, s in redo])
        for (i, s), r_ids in zip(redo, slow, strict=True):
            out[i][s + 1] = r_ids
        for i in ok:
            out[i] = (self._with_bos(out[i][0]), out[i][1], out[i][2])
        return out

    def _slow(self, items: list[tuple[list[int], str, str]]) -> list[list[int]]:
        """Response ids by tokenizing the whole prompt + response; where BPE merges across
        the boundary (the prompt ids are then no prefix), tokenize the response alone, which
        is also what the model sees at inference: the prompt ids, then generated tokens."""
        joint = self.ids([p + r for _, p, r in items])
        merged = [j for j, (p_ids, _, _) in enumerate(items) if joint[j][:len(p_ids)] != p_ids]
        alone = dict(zip(merged, self.ids([items[j][2] for j in merged]), strict=True))
        return [alone[j] if j in alone else joint[j][len(p_ids):]
                for j, (p_ids, _, _) in enumerate(items)]

    def _with_bos(self, ids: list[int]) -> list[int]:
        """Prepend what the tokenizer adds itself (BOS) unless the template already wrote it."""
        pre = self.bos_prefix
        return ids if not pre or ids[:len(pre)] == pre else pre + ids


def _added_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts in front of text on its own (e.g. [BOS]), found by trying it."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    with_special = tokenizer("a")["input_ids"]
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k:k + len(plain)] == plain:
            return list(with_special[:k])
    return []


class _Fitted(NamedTuple):
    prompt: list[int]
    chosen: list[int]  # response ids only
    rejected: list[int]
    prompt_cut: bool
    response_cut: bool


def _fit(p_ids: list[int], rc: list[int], rr: list[int], cfg: TrainConfig,
         bos: int | None) -> _Fitted | str:
    """Apply the length policy: the (possibly shortened) prompt and responses, or a reason."""
    keep = cfg.max_prompt_length
    prompt_cut = len(p_ids) > keep
    if prompt_cut:  # keep the END of the prompt (the last turns) and the BOS
        head = p_ids[:1] if bos is not None and p_ids[0] == bos and keep > 1 else []
        p_ids = head + p_ids[len(p_ids) - (keep - len(head)):]
    room = cfg.max_length - len(p_ids)
    if room < max(1, cfg.min_response_tokens):
        return DROP_PROMPT_TOO_LONG
    response_cut = len(rc) > room or len(rr) > room
    if response_cut:
        # Cut from the end: the end-of-turn token goes too, so no stop is learned mid-thought.
        rc, rr = rc[:room], rr[:room]
        if rc == rr:
            return DROP_IDENTICAL_TRUNCATED
    return _Fitted(p_ids, rc, rr, prompt_cut, response_cut)


def _build(rows: datasets.Dataset, indices: list[int], fmt: str, cfg: TrainConfig,
           enc: _Encoder, source: str) -> tuple[datasets.Dataset | None, DataReport]:
    tally = _Tally()
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
            if isinstance(res, str):
                tally.drop(row, res)
                continue
            p_ids, rc, rr = res
            tally.untruncated += [len(p_ids) + len(rc), len(p_ids) + len(rr)]
            fitted = _fit(p_ids, rc, rr, cfg, bos)
            if isinstance(fitted, str):
                tally.drop(row, fitted)
            else:
                _keep(tally, row, fitted)
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


def _keep(tally: _Tally, row: int, fitted: _Fitted) -> None:
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


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt exactly as training saw it (template, one BOS, no response), for
    generation: what follows them is the model's reply."""
    enc = _Encoder(tokenizer, tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)
    text = enc.render([messages], gen=True)[0]
    if text is None:
        raise DataError("the chat template failed to render this prompt")
    return enc._with_bos(enc.ids([text])[0])


# ----------------------------------------------------------------------------- prepare_data
def prepare_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase,
                 console: Console | None = None) -> PreparedData:
    """Load, convert, tokenize and report the train (and eval) preference pairs of `cfg`."""
    own = getattr(tokenizer, "chat_template", None)
    template = setup_chat_template(tokenizer, cfg.chat_template)
    enc = _Encoder(tokenizer, template)
    if console is not None:
        origin = ("--chat-template" if cfg.chat_template else "the tokenizer's own"
                  if own and template == own else "qorpo's ChatML default (tokenizer has none)")
        console.print(f"[bold]chat template[/]: {origin}")
    _warn_template(enc, console)
    source = cfg.data or _demo_data()
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
        train_idx, eval_idx = split_indices(len(rows), cfg.eval_fraction, cfg.seed)
        eval_rows, eval_source = rows, f"{source} (eval fraction {cfg.eval_fraction:g})"
    if cfg.max_samples is not None:
        train_idx = train_idx[:cfg.max_samples]
    train, train_report = _prepare_one(rows, train_idx, cfg, enc, source, console)
    ev, ev_report = None, None
    if eval_rows is not None:
        idx = eval_idx or list(range(len(eval_rows)))
        ev, ev_report = _prepare_one(eval_rows, idx, cfg, enc, eval_source, console)
    return PreparedData(train, ev, train_report.format, train_report, ev_report, template)


def _prepare_one(rows: datasets.Dataset, idx: list[int], cfg: TrainConfig, enc: _Encoder,
                 source: str, console: Console | None) -> tuple[datasets.Dataset, DataReport]:
    fmt = detect_format(rows.column_names, _first_usable(rows), cfg.columns)
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


def _demo_data() -> str:
    """The bundled demo train file (qorpo.api normally fills cfg.data in for the demo)."""
    path = Path(__file__).parent / "demo_data" / "train.jsonl"
    if not path.is_file():
        raise DataError("no --data given; pass --data FILE or a hub dataset name.")
    return str(path)


def _warn_template(enc: _Encoder, console: Console | None) -> None:
    probe = [[{"role": "user", "content": "ping"}]]
    if console is not None and enc.render(probe, gen=True) == enc.render(probe, gen=False):
        console.print("[yellow]warning[/]: the chat template ignores add_generation_prompt, so "
                      "the assistant header is scored as part of each response.")


_ADVICE = {
    DROP_PROMPT_TOO_LONG: "raise --max-length, or lower --max-prompt-length / "
                          "--min-response-tokens",
    DROP_IDENTICAL_TRUNCATED: "raise --max-length (both responses start alike)",
    DROP_TEMPLATE: "pass a chat template that renders these conversations (--chat-template)",
}


def _nothing_left(report: DataReport, cfg: TrainConfig) -> str:
    lines = [f"no usable preference pairs in {report.source} ({report.rows_read} rows read, "
             f"format {report.format}, max_length {cfg.max_length}, max_prompt_length "
             f"{cfg.max_prompt_length}, min_response_tokens {cfg.min_response_tokens}):"]
    for reason, info in report.dropped.items():
        advice = _ADVICE.get(reason, "check the columns (--columns) and the data")
        lines.append(f"  {reason}: {info.count} rows (e.g. rows {info.first_rows}) -> {advice}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- collator
class PairCollator:
    """Batch of B pairs -> input_ids/attention_mask/response_mask (2B, T), row (B,).

    Rows [0:B] are the chosen sequences, [B:2B] the rejected ones of the same pairs. Right
    padding; T is rounded up to a multiple of `pad_to_multiple_of` (8: tensor-core friendly
    shapes, fewer distinct shapes). Masks come from positions, never from comparing ids with
    the pad id (pad may equal EOS, and that EOS is a scored response token).
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int = 8) -> None:
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)  # masked anyway
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [f[f"{side}_input_ids"] for side in ("chosen", "rejected") for f in features]
        starts = [int(f[f"{side}_response_start"]) for side in ("chosen", "rejected")
                  for f in features]
        longest = max(len(s) for s in seqs)
        t = -(-longest // self.multiple) * self.multiple
        input_ids = torch.full((len(seqs), t), self.pad_token_id, dtype=torch.long)  # (2B, T)
        attention_mask = torch.zeros((len(seqs), t), dtype=torch.long)  # (2B, T)
        response_mask = torch.zeros((len(seqs), t), dtype=torch.long)  # (2B, T)
        for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            n = len(seq)
            input_ids[i, :n] = torch.as_tensor(seq, dtype=torch.long)
            attention_mask[i, :n] = 1
            response_mask[i, start:n] = 1
        rows = torch.tensor([int(f["row"]) for f in features], dtype=torch.long)  # (B,)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "response_mask": response_mask, "row": rows}
