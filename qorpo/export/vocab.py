"""The tokenizer half of a GGUF file, and the Ollama Modelfile next to it.

llama.cpp re-implements the tokenizer from metadata: the vocabulary with a type per token,
the BPE merges, the pre-tokenizer by *name* (``tokenizer.ggml.pre``: llama.cpp applies its own
copy of that split regex), the special ids (bos / eos / unk / pad / end-of-turn), whether to add
BOS / EOS, and the Jinja chat template. Two kinds are exported:

* byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM style): ``tokenizer.ggml.model = "gpt2"``;
* SentencePiece (Llama 2, Mistral v0.1-0.3, Gemma style): ``"llama"``, with a score and a type
  per piece, read by the gguf package's own vocab classes: ``SentencePieceVocab`` from
  tokenizer.model, else ``LlamaHfVocab`` from the tokenizer.json transformers converted it to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import gguf

from qorpo.atomic import replacing
from qorpo.errors import MergeError
from qorpo.hf import end_of_turn_id

# tokenizer.json split regexes -> llama.cpp's tokenizer.ggml.pre (the regex llama.cpp applies).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


class TokenizerMeta(NamedTuple):
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str | None  # None for SentencePiece (llama.cpp applies no pre-tokenizer there)
    special: dict[str, int]  # bos / eos / unk / pad / eot -> id (absent when the model has none)
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    stops: tuple[str, ...]  # end-of-turn / eos token texts, for the Modelfile
    sample: str | None  # one user turn "hi" + generation prompt as the template renders it
    model: str = "gpt2"  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    scores: list[float] | None = None  # SentencePiece: one per token
    add_space_prefix: bool | None = None  # SentencePiece: does the tokenizer prepend "▁"?


def pre_tokenizer(tokenizer: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json (as a dict)."""

    def flat(p: dict[str, Any] | None) -> list[dict[str, Any]]:
        if p is None:
            return []
        return [q for s in p["pretokenizers"] for q in flat(s)] if p["type"] == "Sequence" else [p]

    steps = flat(tokenizer.get("pre_tokenizer"))
    kinds = [s["type"] for s in steps]
    regex = steps[0].get("pattern", {}).get("Regex") if steps else None
    if any(s.get("add_prefix_space") for s in steps if s["type"] == "ByteLevel"):
        kinds.append("(with a prefix space)")  # llama.cpp's BPE never adds one
    elif kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # llama.cpp: single digits, then the GPT-2 regex
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pre = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(regex or "")
        if pre:
            return pre
    raise MergeError(
        f"unrecognised pre-tokenizer {kinds} (split {regex!r}); llama.cpp needs to know it "
        "(tokenizer.ggml.pre). Known: GPT-2, Llama 3, Qwen2 and SmolLM byte-level BPE."
    )


def _is_sentencepiece(src: Path, data: dict[str, Any]) -> bool:
    """A SentencePiece vocabulary: tokenizer.model, or its tokenizer.json conversion (BPE with
    byte fallback and the "▁" word marker instead of byte-level pre-tokenization)."""
    if "ByteLevel" in json.dumps(data.get("pre_tokenizer")):
        return False  # byte-level BPE, whatever other files lie next to it
    model = data["model"]
    return (src / "tokenizer.model").is_file() or (
        model["type"] == "BPE" and bool(model.get("byte_fallback"))
    )


def _sentencepiece_vocab(src: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) per id, by the gguf package's vocab classes (as llama.cpp converts)."""
    if (src / "tokenizer.model").is_file():
        try:
            vocab: Any = gguf.vocab.SentencePieceVocab(src)
        except ImportError:  # the sentencepiece package is optional: use tokenizer.json instead
            vocab = None
        if vocab is not None:
            return [(t.decode(), s, int(k)) for t, s, k in vocab.all_tokens()]
    try:
        vocab = gguf.vocab.LlamaHfVocab(src)
    except (FileNotFoundError, TypeError) as exc:
        raise MergeError(
            f"{src}: a SentencePiece-style tokenizer the GGUF export cannot read ({exc}); "
            "keep its tokenizer.model next to it (and `pip install sentencepiece`)"
        ) from None
    pieces = [(t.decode(), s, int(k)) for t, s, k in vocab.all_tokens()]
    return _merge_scores(pieces, json.loads((src / "tokenizer.json").read_text()))


def _merge_scores(
    pieces: list[tuple[str, float, int]], data: dict[str, Any]
) -> list[tuple[str, float, int]]:
    """LlamaHfVocab gives every piece the placeholder score -1000, but llama.cpp's SentencePiece
    tokenizer merges the pair whose joined piece scores highest: so score each piece by the rank
    of the BPE merge that makes it (-rank), which replays tokenizer.json's merge order. Pieces no
    merge makes (characters, bytes, specials) are never a merge result: their score is unused."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(data["model"].get("merges", [])):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(a + b, i)
    return [(t, float(-rank[t]) if t in rank else s, k) for t, s, k in pieces]


def _vocab(
    src: Path, data: dict[str, Any], n_vocab: int, spm: bool
) -> tuple[list[str], list[int], list[float] | None]:
    """Tokens, types (and SentencePiece scores) for ``n_vocab`` ids; ids the tokenizer lacks get
    placeholders, as llama.cpp's converter writes them."""
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [gguf.TokenType.UNUSED] * n_vocab
    scores = [-1000.0] * n_vocab if spm else None
    pieces = _sentencepiece_vocab(src) if spm else []
    entries: list[tuple[str, int, int]] = [(t, i, k) for i, (t, _, k) in enumerate(pieces)]
    if not spm:
        entries = [(t, i, gguf.TokenType.NORMAL) for t, i in data["model"]["vocab"].items()]
    for a in data.get("added_tokens", []):  # after the vocab: their type wins
        kind = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
        entries.append((a["content"], a["id"], kind))
    for text, i, kind in entries:
        if i >= n_vocab:
            raise MergeError(f"token {text!r} has id {i} >= the model's vocab_size {n_vocab}")
        tokens[i], types[i] = text, kind
    if scores is not None:
        for i, (_, score, _) in enumerate(pieces):
            scores[i] = float(score)
    return tokens, [int(t) for t in types], scores


def tokenizer_meta(src: Path, n_vocab: int, trust_remote_code: bool = False) -> TokenizerMeta:
    """Vocabulary (``n_vocab`` entries, placeholders for ids the tokenizer lacks), merges or
    scores, special ids, BOS/EOS policy and chat template of the tokenizer in ``src``."""
    from transformers import AutoTokenizer

    if not (src / "tokenizer.json").is_file() and not (src / "tokenizer.model").is_file():
        raise MergeError(f"GGUF export needs a byte-level BPE tokenizer.json or a SentencePiece "
                         f"tokenizer.model; {src} has neither")
    tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    # The tokenizer as transformers runs it (its class may replace tokenizer.json's pre-tokenizer,
    # e.g. Qwen2Tokenizer), which is also what llama.cpp's converter fingerprints.
    data = json.loads(tok.backend_tokenizer.to_str())
    spm = _is_sentencepiece(src, data)
    if not spm and (data["model"]["type"] != "BPE"
                    or "ByteLevel" not in json.dumps(data["pre_tokenizer"])):  # fmt: skip
        raise MergeError(
            f"GGUF export supports byte-level BPE (Llama 3, Qwen2, SmolLM) and SentencePiece "
            f"(Llama 2, Mistral, Gemma) tokenizers; {src} has a {data['model']['type']} one"
        )
    pre = None if spm else pre_tokenizer(data)
    tokens, types, scores = _vocab(src, data, n_vocab, spm)
    ids = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    ids["eot"] = end_of_turn_id(tok)
    special = {k: int(v) for k, v in ids.items() if v is not None}
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    # Measured, not read from a flag: does the HF tokenizer add BOS / EOS to plain text?
    add_bos = ids["bos"] is not None and full[:1] == [ids["bos"]] and plain[:1] != full[:1]
    add_eos = ids["eos"] is not None and full[-1:] == [ids["eos"]] and plain[-1:] != full[-1:]
    space = tok.convert_ids_to_tokens(plain)[0].startswith("\u2581") if spm and plain else None
    gen_path = src / "generation_config.json"
    gen_eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.is_file() else None
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    stop_ids = [i for i in (ids["eot"], ids["eos"], *gen_eos) if i is not None and i < n_vocab]
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    sample = None
    if template:  # without BOS when llama.cpp / Ollama add it themselves (add_bos)
        sample = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        sample = sample.removeprefix(tok.bos_token) if add_bos and tok.bos_token else sample
    merges = [] if spm else gguf.SpecialVocab(src, load_merges=True, special_token_types=()).merges
    return TokenizerMeta(
        tokens, types, merges, pre, special, add_bos, add_eos, template,
        tuple(dict.fromkeys(tokens[i] for i in stop_ids)), sample,
        "llama" if spm else "gpt2", scores, space,
    )


def add_tokenizer(w: gguf.GGUFWriter, meta: TokenizerMeta) -> None:
    w.add_tokenizer_model(meta.model)  # llama.cpp's names: "gpt2" byte-level BPE, "llama" SPM
    if meta.pre is not None:
        w.add_tokenizer_pre(meta.pre)
    w.add_token_list(meta.tokens)
    w.add_token_types(meta.types)
    if meta.scores is not None:
        w.add_token_scores(meta.scores)
    if meta.merges:
        w.add_token_merges(meta.merges)
    if meta.add_space_prefix is not None:
        w.add_add_space_prefix(meta.add_space_prefix)
    for kind, token_id in meta.special.items():
        getattr(w, f"add_{kind}_token_id")(token_id)
    # Written explicitly: llama.cpp's default for BPE depends on the pre-tokenizer.
    w.add_add_bos_token(meta.add_bos)
    w.add_add_eos_token(meta.add_eos)
    if meta.chat_template:
        w.add_chat_template(meta.chat_template)


# Chat formats recognised by a marker in the Jinja template: (marker, one turn, generation prompt).
# The Go template is built from the same pieces, so Ollama renders what the Jinja template does.
_FORMATS = {
    "ChatML": (
        "<|im_start|>", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n"
    ),
    "Llama 3": (
        "<|start_header_id|>",
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
}


def modelfile_text(
    gguf_file: str, chat_template: str | None, stops: Sequence[str], sample: str | None = None
) -> str:
    """An Ollama Modelfile for ``gguf_file`` (a path relative to the Modelfile's folder).

    ``sample``: the Jinja template's rendering of one user turn "hi" plus the generation prompt
    (without BOS). It checks the recognised format, and a default system prompt the template
    adds when none is given becomes ``SYSTEM`` (Ollama has no other way to know it).
    """
    lines = [f"FROM ./{gguf_file}", ""]
    style = next((k for k, f in _FORMATS.items() if f[0] in (chat_template or "")), None)
    if style is None:
        lines += [
            "# The chat template was not recognised (ChatML and Llama 3 are): write TEMPLATE by",
            "# hand in Go template syntax. llama.cpp uses the GGUF's embedded template as is.",
        ]
    else:
        _, turn, prompt = _FORMATS[style]
        go = turn.format(role="{{ .Role }}", content="{{ .Content }}")
        lines.append(f"# {style} chat format, from the model's chat template.")
        expected = turn.format(role="user", content="hi") + prompt
        prefix = sample[: -len(expected)] if sample and sample.endswith(expected) else ""
        system = turn.format(role="system", content="\0").split("\0")
        if sample is not None and not sample.endswith(expected):
            lines.append("# NOTE: the model's template renders a turn differently: check TEMPLATE.")
        elif prefix.startswith(system[0]) and prefix.endswith(system[1]):
            lines.append(f'SYSTEM """{prefix[len(system[0]) : -len(system[1])]}"""')
        elif prefix:
            lines.append(f"# NOTE: the model's template starts with {prefix!r}.")
        lines.append(f'TEMPLATE """{{{{- range .Messages }}}}{go}{{{{ end }}}}{prompt}"""')
    lines += ["", *(f"PARAMETER stop {json.dumps(s)}" for s in stops)]
    return "\n".join(lines) + "\n"


def write_modelfile(path: str | os.PathLike[str], gguf_file: str, meta: TokenizerMeta) -> Path:
    """Write the Modelfile for ``gguf_file`` and ``meta`` to ``path``, atomically."""
    target = Path(path)
    with replacing(target) as tmp:
        tmp.write_text(modelfile_text(gguf_file, meta.chat_template, meta.stops, meta.sample))
    return target
