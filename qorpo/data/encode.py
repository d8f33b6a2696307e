"""Chat template and tokenization: how a preference pair becomes token ids.

Token layout of one example (both sides share the prompt ids):

    [BOS?] prompt (rendered with add_generation_prompt=True) | response ... end-of-turn
    ^0                                                         ^response_start          ^len

The response is scored up to and including the template's end-of-turn/EOS token; whitespace the
template writes after it (ChatML's "\\n") is dropped. See docs/data.md for the policy.
`prompt_ids` is the one prompt encoding: training, generation and merge verification use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from qorpo.data.formats import DROP_TEMPLATE, DropRow, Message, Pair
from qorpo.errors import DataError

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedTokenizerBase

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
    return path.read_text(encoding="utf-8-sig")  # a BOM would land in every prompt


class Encoded(NamedTuple):
    prompt: list[int]  # with the BOS the tokenizer adds on its own, if any
    chosen: list[int]  # response ids only
    rejected: list[int]


class Encoder:
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

    def encode(self, pairs: list[Pair]) -> list[Encoded | DropRow]:
        """Ids per pair, or the DropRow for a pair the template cannot render (returned, not
        raised: one bad row must not stop the batch)."""
        prompts = self.render([p.prompt for p in pairs], gen=True)
        sides = [self.render([[*p.prompt, {"role": "assistant", "content": getattr(p, side)}]
                              for p in pairs], gen=False) for side in ("chosen", "rejected")]
        resp = [[self.close(p, f) for p, f in zip(prompts, full, strict=True)] for full in sides]
        ok = [i for i in range(len(pairs)) if resp[0][i] is not None and resp[1][i] is not None]
        tails = [self.tail(prompts[i]) for i in ok]
        n = len(ok)
        flat = self.ids([prompts[i] for i in ok] + tails
                        + [tails[k] + resp[s][i] for s in (0, 1) for k, i in enumerate(ok)])
        out: list[Any] = [DropRow(DROP_TEMPLATE)] * len(pairs)
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
            out[i] = Encoded(self.with_bos(out[i][0]), out[i][1], out[i][2])
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

    def with_bos(self, ids: list[int]) -> list[int]:
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


def prompt_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of a prompt exactly as training saw it (template, one BOS, no response), for
    generation: what follows them is the model's reply."""
    enc = Encoder(tokenizer, tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)
    text = enc.render([messages], gen=True)[0]
    if text is None:
        raise DataError("the chat template failed to render this prompt")
    return enc.with_bos(enc.ids([text])[0])


def warn_template(enc: Encoder, console: Console | None) -> None:
    probe = [[{"role": "user", "content": "ping"}]]
    if console is not None and enc.render(probe, gen=True) == enc.render(probe, gen=False):
        console.print("[yellow]warning[/]: the chat template ignores add_generation_prompt, so "
                      "the assistant header is scored as part of each response.")
