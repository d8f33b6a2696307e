"""The tokenizer half of a GGUF file, and the Ollama Modelfile next to it.

llama.cpp re-implements the tokenizer from metadata: the vocabulary with a type per token,
the BPE merges, the pre-tokenizer by *name* (``tokenizer.ggml.pre``: llama.cpp applies its own
copy of that split regex), the special ids (bos / eos / unk / pad / end-of-turn), whether to add
BOS / EOS, and the Jinja chat template. Only byte-level BPE tokenizers are exported (GPT-2,
Llama 3, Qwen2, SmolLM style); SentencePiece ones are refused with a clear error.
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
    pre: str
    special: dict[str, int]  # bos / eos / unk / pad / eot -> id (absent when the model has none)
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    stops: tuple[str, ...]  # end-of-turn / eos token texts, for the Modelfile
    sample: str | None  # one user turn "hi" + generation prompt as the template renders it


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


def tokenizer_meta(src: Path, n_vocab: int, trust_remote_code: bool = False) -> TokenizerMeta:
    """Vocabulary (``n_vocab`` entries, placeholders for ids the tokenizer lacks), merges,
    special ids, BOS/EOS policy and chat template of the tokenizer in ``src``."""
    from transformers import AutoTokenizer

    if not (src / "tokenizer.json").is_file():
        kind = "a SentencePiece (tokenizer.model)" if (src / "tokenizer.model").is_file() else "no"
        raise MergeError(f"GGUF export needs a byte-level BPE tokenizer.json; {src} has {kind} one")
    tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    # The tokenizer as transformers runs it (its class may replace tokenizer.json's pre-tokenizer,
    # e.g. Qwen2Tokenizer), which is also what llama.cpp's converter fingerprints.
    data = json.loads(tok.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(data["pre_tokenizer"]):
        raise MergeError(
            f"GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM); {src} has "
            f"a {data['model']['type']} one (SentencePiece-style tokenizers are not supported yet)"
        )
    pre = pre_tokenizer(data)
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [gguf.TokenType.UNUSED] * n_vocab
    entries = [(t, i, gguf.TokenType.NORMAL) for t, i in data["model"]["vocab"].items()]
    for a in data.get("added_tokens", []):  # after the vocab: their type wins
        kind = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
        entries.append((a["content"], a["id"], kind))
    for text, i, kind in entries:
        if i >= n_vocab:
            raise MergeError(f"token {text!r} has id {i} >= the model's vocab_size {n_vocab}")
        tokens[i], types[i] = text, kind
    ids = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    ids["eot"] = end_of_turn_id(tok)
    special = {k: int(v) for k, v in ids.items() if v is not None}
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    # Measured, not read from a flag: does the HF tokenizer add BOS / EOS to plain text?
    add_bos = ids["bos"] is not None and full[:1] == [ids["bos"]] and plain[:1] != full[:1]
    add_eos = ids["eos"] is not None and full[-1:] == [ids["eos"]] and plain[-1:] != full[-1:]
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
    merges = gguf.SpecialVocab(src, load_merges=True, special_token_types=()).merges
    return TokenizerMeta(
        tokens, [int(t) for t in types], merges, pre, special, add_bos, add_eos, template,
        tuple(dict.fromkeys(tokens[i] for i in stop_ids)), sample,
    )


def add_tokenizer(w: gguf.GGUFWriter, meta: TokenizerMeta) -> None:
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(meta.pre)
    w.add_token_list(meta.tokens)
    w.add_token_types(meta.types)
    w.add_token_merges(meta.merges)
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
