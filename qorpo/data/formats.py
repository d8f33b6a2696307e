"""Preference-data formats: detect which layout a dataset's rows use, and turn a row into
messages.

Every format ends up as the same `Pair`: the prompt as a list of `{role, content}` messages
(multi-turn kept whole, system turns as role "system") and the two responses as plain strings.
A row that cannot be used raises `DropRow(reason)`; the reason is one of the `DROP_*` names so
the report can count rows per reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from qorpo.errors import DataError

Message = dict[str, str]


class DropRow(Exception):  # noqa: N818 - it is a control-flow signal, not an error
    """Raised by `to_messages` for a row that is skipped (and counted under `reason`)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Pair(NamedTuple):
    prompt: list[Message]
    chosen: str
    rejected: str


# Drop reasons (keys of DataReport.dropped).
DROP_MISSING = "missing field"
DROP_EMPTY = "empty field"
DROP_NOT_STRING = "non-string field"
DROP_NOT_TEXT = "non-text content (image, audio, …)"
DROP_MALFORMED = "malformed conversation"
DROP_PROMPTS_DIFFER = "chosen/rejected prompts differ"
DROP_IDENTICAL = "identical chosen and rejected"
DROP_TEMPLATE = "chat template error"
DROP_PROMPT_TOO_LONG = "prompt too long"
DROP_IDENTICAL_TRUNCATED = "identical after truncation"

FORMATS = ("ultrafeedback", "messages", "explicit", "orca", "hh-rlhf", "sharegpt", "columns")
FORMAT_HELP = {
    "ultrafeedback": "chosen/rejected = full message lists sharing the prompt turns",
    "messages": "chosen_messages/rejected_messages = full message lists (LLaMA-Factory)",
    "explicit": "prompt, chosen, rejected (strings or message lists), optional system",
    "orca": "system, question, chosen, rejected",
    "hh-rlhf": "chosen/rejected = '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts",
    "sharegpt": "conversations [{from, value}], chosen/rejected {from, value}",
    "columns": "--columns prompt=COL,chosen=COL,rejected=COL[,system=COL]; without prompt=, "
               "chosen/rejected are full conversations",
}
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
          "gpt": "assistant", "model": "assistant"}


# ----------------------------------------------------------------------------- detection
def detect_format(
    column_names: Sequence[str], first_row: Mapping[str, Any], columns_mapping: Mapping[str, str],
    source: str = "the data",
) -> str:
    """Name of the format of a dataset from its columns (and the first usable row's types);
    `source` (the file or hub name) is named in the error when none fits."""
    cols = set(column_names)
    if columns_mapping:
        _check_mapping(cols, columns_mapping, source)
        return "columns"
    if {"chosen_messages", "rejected_messages"} <= cols:
        return "messages"
    if {"conversations", "chosen", "rejected"} <= cols:
        return "sharegpt"
    if {"question", "chosen", "rejected"} <= cols:
        return "orca"
    if {"chosen", "rejected"} <= cols:
        chosen = first_row.get("chosen")
        if isinstance(chosen, list):
            # Full conversations carry the prompt turns; TRL's explicit lists hold only the reply.
            if any(isinstance(m, Mapping) and m.get("role") != "assistant" for m in chosen):
                return "ultrafeedback"
            if "prompt" in cols:
                return "explicit"
        elif "prompt" in cols:
            return "explicit"
        elif isinstance(chosen, str) and "Human:" in chosen and "Assistant:" in chosen:
            return "hh-rlhf"
    raise DataError(_unknown_format_message(sorted(cols), first_row, source))


def _unknown_format_message(cols: list[str], first_row: Mapping[str, Any], source: str) -> str:
    known = "\n".join(f"  {name:14s} {desc}" for name, desc in FORMAT_HELP.items())
    types = ", ".join(f"{k} {type(first_row[k]).__name__}" for k in cols if k in first_row)
    why = ""
    if {"chosen", "rejected"} <= set(cols):  # the usual near miss: say which rule failed
        why = (" chosen/rejected are there, but there is no prompt column, and chosen is "
               "neither a '\\n\\nHuman: …\\n\\nAssistant: …' transcript nor a conversation "
               "that holds the prompt turns.")
    types = f" (first row: {types})" if types else ""
    return (f"could not detect the preference-data format of {source}. Columns found: "
            f"{cols}{types}.{why}\n"
            f"Known formats:\n{known}\n"
            "Map your columns with --columns, e.g. --columns prompt=question,chosen=good,"
            "rejected=bad (YAML: columns: {prompt: question, ...}).")


def _check_mapping(cols: set[str], mapping: Mapping[str, str], source: str) -> None:
    wanted = {k: mapping.get(k, k) for k in ("chosen", "rejected")}
    if "prompt" in mapping or "prompt" in cols:  # else chosen/rejected hold whole conversations
        wanted["prompt"] = mapping.get("prompt", "prompt")
    if "system" in mapping:
        wanted["system"] = mapping["system"]
    missing = {k: v for k, v in wanted.items() if v not in cols}
    if missing:
        shown = ", ".join(f"{k}={v}" for k, v in missing.items())
        raise DataError(f"--columns maps {shown}, but {source} has no such column. "
                        f"Columns found: {sorted(cols)}. Fix the mapping (keys: prompt, "
                        "chosen, rejected, system).")


# ----------------------------------------------------------------------------- conversion
def to_messages(row: Mapping[str, Any], fmt: str, columns: Mapping[str, str]) -> Pair:
    """Convert one row of format `fmt` to a Pair, or raise DropRow(reason)."""
    if fmt == "ultrafeedback":
        pair = _from_conversations(row)
    elif fmt == "messages":
        pair = _from_conversations(row, "chosen_messages", "rejected_messages")
    elif fmt == "explicit":
        pair = _explicit(row, "prompt", "system")
    elif fmt == "orca":
        pair = _explicit(row, "question", "system")
    elif fmt == "columns":
        names = {k: columns.get(k, k) for k in ("prompt", "chosen", "rejected")}
        if "prompt" not in columns and "prompt" not in row:
            pair = _from_conversations(row, names["chosen"], names["rejected"])
        else:
            pair = _explicit(row, names["prompt"], columns.get("system", "system"),
                             names["chosen"], names["rejected"])
    elif fmt == "hh-rlhf":
        pair = _from_hh(row)
    elif fmt == "sharegpt":
        pair = _from_sharegpt(row)
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if pair.chosen.strip() == pair.rejected.strip():
        raise DropRow(DROP_IDENTICAL)
    return pair


def _text(value: Any, field: str, *, allow_empty: bool = False) -> str:
    if value is None:
        raise DropRow(DROP_MISSING, field)
    if not isinstance(value, str):
        raise DropRow(DROP_NOT_STRING, f"{field} is {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DropRow(DROP_EMPTY, field)
    return value


def _content(value: Any, field: str) -> Any:
    """Message content as text: a string, or a list of parts whose text parts are joined
    (OpenAI `{"type": "text", "text": …}`, LLaMA-Factory `{"type": "text", "value": …}`)."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise DropRow(DROP_MALFORMED, f"{field}: content part is {type(part).__name__}")
        kind = part.get("type", "text")
        if kind != "text":
            raise DropRow(DROP_NOT_TEXT, f"{field}: a {kind!r} part")
        texts.append(part.get("text", part.get("value")))
        if not isinstance(texts[-1], str):
            raise DropRow(DROP_NOT_STRING, f"{field}: text part without a string")
    return "".join(texts)


def _message(m: Any, field: str, role_key: str = "role", text_key: str = "content") -> Message:
    if not isinstance(m, Mapping):
        raise DropRow(DROP_MALFORMED, f"{field}: message is {type(m).__name__}, not a mapping")
    role = _ROLES.get(str(m.get(role_key)).lower())
    if role is None:
        raise DropRow(DROP_MALFORMED, f"{field}: unknown role {m.get(role_key)!r}")
    # An empty system turn is a common placeholder; it is kept (and skipped later) not dropped.
    content = _text(_content(m.get(text_key), field), field, allow_empty=role == "system")
    return {"role": role, "content": content}


def _messages(value: Any, field: str, role_key: str = "role",
              text_key: str = "content") -> list[Message]:
    if value is None:
        raise DropRow(DROP_MISSING, field)
    if not isinstance(value, list):
        raise DropRow(DROP_NOT_STRING, f"{field} is {type(value).__name__}")
    msgs = [_message(m, field, role_key, text_key) for m in value]
    msgs = [m for m in msgs if m["role"] != "system" or m["content"].strip()]
    if not msgs:
        raise DropRow(DROP_EMPTY, field)
    return msgs


def _reply(value: Any, field: str) -> str:
    """A response given as a string or as a one-message assistant list (TRL conversational)."""
    if isinstance(value, list):
        msgs = _messages(value, field)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise DropRow(DROP_MALFORMED, f"{field}: expected one assistant message")
        return msgs[0]["content"]
    return _text(value, field)


def _explicit(row: Mapping[str, Any], prompt_key: str, system_key: str,
              chosen_key: str = "chosen", rejected_key: str = "rejected") -> Pair:
    raw = row.get(prompt_key)
    prompt = (_messages(raw, prompt_key) if isinstance(raw, list)
              else [{"role": "user", "content": _text(raw, prompt_key)}])
    system = row.get(system_key)
    if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return Pair(prompt, _reply(row.get(chosen_key), chosen_key),
                _reply(row.get(rejected_key), rejected_key))


def _split_last(msgs: list[Message], field: str) -> tuple[list[Message], str]:
    if msgs[-1]["role"] != "assistant":
        raise DropRow(DROP_MALFORMED, f"{field}: last message is not from the assistant")
    return msgs[:-1], msgs[-1]["content"]


def _shared_prompt(pc: list[Message], pr: list[Message]) -> list[Message]:
    if pc != pr:
        raise DropRow(DROP_PROMPTS_DIFFER)
    if not pc:
        raise DropRow(DROP_EMPTY, "prompt")
    return pc


def _from_conversations(row: Mapping[str, Any], chosen_key: str = "chosen",
                        rejected_key: str = "rejected") -> Pair:
    """Two whole conversations that share their prompt turns (a per-message `loss_weight`, as
    LLaMA-Factory writes, is ignored: ORPO scores the final assistant turn of each side)."""
    pc, chosen = _split_last(_messages(row.get(chosen_key), chosen_key), chosen_key)
    pr, rejected = _split_last(_messages(row.get(rejected_key), rejected_key), rejected_key)
    if not pc and not pr and row.get("prompt") is not None:
        # Reply-only lists next to a prompt: the prompt column is the user turn (or turns).
        raw = row.get("prompt")
        pc = pr = (_messages(raw, "prompt") if isinstance(raw, list)
                   else [{"role": "user", "content": _text(raw, "prompt")}])
    return Pair(_shared_prompt(pc, pr), chosen, rejected)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def parse_hh(text: Any, field: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{user: a}, {assistant: b}]."""
    text = _text(text, field)
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip() or len(parts) < 3:
        raise DropRow(DROP_MALFORMED, f"{field}: not a Human/Assistant transcript")
    msgs = []
    for who, said in zip(parts[1::2], parts[2::2], strict=True):
        msgs.append({"role": "user" if who == "Human" else "assistant", "content": said.strip()})
    for m in msgs[:-1]:
        _text(m["content"], field)
    return msgs


def _from_hh(row: Mapping[str, Any]) -> Pair:
    pc, chosen = _split_last(parse_hh(row.get("chosen"), "chosen"), "chosen")
    pr, rejected = _split_last(parse_hh(row.get("rejected"), "rejected"), "rejected")
    return Pair(_shared_prompt(pc, pr), _text(chosen, "chosen"), _text(rejected, "rejected"))


def _sharegpt_reply(value: Any, field: str) -> str:
    if isinstance(value, Mapping):
        keys = ("from", "value") if "from" in value else ("role", "content")
        msg = _message(value, field, *keys)
        if msg["role"] != "assistant":
            raise DropRow(DROP_MALFORMED, f"{field}: reply is from {msg['role']}")
        return msg["content"]
    return _text(value, field)


def _from_sharegpt(row: Mapping[str, Any]) -> Pair:
    conv = row.get("conversations")
    keys = ("from", "value")
    if isinstance(conv, list) and conv and isinstance(conv[0], Mapping) and "from" not in conv[0]:
        keys = ("role", "content")  # the same layout with OpenAI-style keys
    prompt = _messages(conv, "conversations", *keys)
    return Pair(prompt, _sharegpt_reply(row.get("chosen"), "chosen"),
                _sharegpt_reply(row.get("rejected"), "rejected"))
