"""Check a GGUF file against the merged HF model it was exported from, with an independent reader.

The file is read back by transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``: it
parses the metadata into a config and a tokenizer, dequantises every tensor and undoes llama.cpp's
Q/K permutation and Gemma's +1 norms) - code that shares nothing with our writer but the gguf
package - where it reads the family (``Family.hf_reader``); for the others (Gemma 1, OLMo 2,
Granite, SmolLM3, GPT-NeoX, Mixtral, Cohere, GLM-4) by ``readback.py``: the tensors, transforms
undone, loaded into the HF model class. Either way the model is compared with the HF model on a
few chat prompts (encoded as training encodes prompts), and every metadata key llama.cpp reads
for the family is compared with config.json (``readback.check_hparams``). Models are loaded
one after the other (HF, then GGUF); the peak, during transformers' GGUF load (a dequantised
state dict, then the model), is about two fp32 copies of the model (``FP32_COPIES``).

Logits (all positions of prompt + greedy continuation), with ``scale = max(1, max|HF logit|)``:

* ``rounding_gap``: the export's rounding replayed on the HF weights (same type per tensor, the
  gguf package's quantiser; 1-D tensors stay fp32), measured on the logits.
* ``exact_gap``: GGUF model vs that rounded HF model. A correct file holds exactly the rounded
  weights, so this is fp32 noise (measured: exactly 0): must be <= ``EXACT_RTOL * scale``.
* ``max_abs``: GGUF model vs the HF model. f16 / bf16: must be <= ``TOL_MULT * rounding_gap +
  EXACT_RTOL * scale`` (the rounding measured; a correct file lands at 1.00x). q8_0: a fixed
  ``Q8_RTOL * scale``: the q8_0 rounding measured 0.020-0.037 x scale on 8 tiny Llama / Qwen2
  (2-16 layers) and on SmolLM2-135M (0.033); 0.08 is ~2x that. Fixed, so that a broken
  quantiser cannot widen its own tolerance (``exact_gap`` ties the file to the weights).
  Mixture-of-experts q8_0 is the exception: the rounding flips near-tied expert routes, a jump
  the fixed bound cannot cover (tiny Qwen3-MoE / Mixtral: 0.40-1.05 x scale, ``exact_gap`` 0), so
  it gets f16's ``TOL_MULT * rounding_gap`` and the quantiser is checked on the weights instead:
  every q8_0 value within half a step of the original (``readback.within_q8_bound``).

Greedy: the same argmax at the last prompt position and at each of ``GEN_TOKENS`` greedily
generated steps (teacher-forced on the HF continuation: same argmax at each step means the same
generation). A different argmax passes only at a near-tie (HF top-2 margin <= 2 x tolerance).

Tokenizer and metadata: the GGUF tokenizer encodes the prompts (through its own chat template)
and a test string (special tokens, digits, whitespace, unicode) to exactly the HF ids; the chat
template is embedded and equal; bos / eos / end-of-turn ids are equal; the config read back
matches config.json. Any NaN fails.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gguf
import numpy as np
import torch

from qorpo.data.encode import prompt_ids
from qorpo.errors import MergeError
from qorpo.export.families import Family, family_of, is_moe
from qorpo.export.gguf import tensor_type
from qorpo.export.hparams import OUT_TYPES, read_config, rope_freqs, rope_parameters
from qorpo.export.readback import (
    check_hparams,
    check_spm_scores,
    gguf_name,
    load_readback_model,
    within_q8_bound,
)
from qorpo.hf import end_of_turn_id, quiet

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PROMPTS = (
    "What is the capital of France?",
    "Write one short sentence about the sea.",
    "Count from 7 to 12, please.",
)
TOKENIZER_TEXT = "Hello  world!\n\n\tdigits 1234567 and 3.14; café ünï — 🙂 <|im_end|>\r\nend "
GEN_TOKENS = 4
READBACK = "independent read-back (gguf reader, transforms undone, HF model class)"
TOL_MULT = 2.0
EXACT_RTOL = 1e-5
Q8_RTOL = 0.08  # measured 0.020-0.037 (tiny Llama/Qwen2 2-16 layers, SmolLM2-135M): ~2x
# Peak memory of a verification in fp32 copies of the model (qorpo merge's auto-verify rule):
# transformers' GGUF load holds a dequantised fp32 state dict and the model (2) while the file is
# mapped (f16: 0.5). Measured on SmolLM2-135M above the interpreter: 1.90x (q8_0), 2.13x (f16).
FP32_COPIES = 2.5
_CONFIG_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings",
)  # fmt: skip


class GGUFVerifyReport(NamedTuple):
    out_type: str
    max_abs: float  # GGUF vs HF logits
    tolerance: float
    rounding_gap: float  # HF vs HF with the export's rounding
    exact_gap: float  # GGUF vs HF with the export's rounding
    greedy_agreement: float  # fraction of all positions with the same argmax (raw)
    generation_agrees: bool  # next token + GEN_TOKENS greedy steps (near-ties allowed)
    tokens_checked: int
    problems: tuple[str, ...]
    passed: bool
    method: str = "transformers' GGUF loader"  # or READBACK: how the file's model was built


    def summary(self) -> str:
        lines = [
            f"GGUF verification ({self.out_type}): {'OK' if self.passed else 'FAILED'}",
            f"  logits max|Δ| vs HF {self.max_abs:.3g} (tolerance {self.tolerance:.3g}; the "
            f"{self.out_type} rounding alone: {self.rounding_gap:.3g}; vs the rounded HF model: "
            f"{self.exact_gap:.3g})",
            f"  greedy agreement {self.greedy_agreement:.1%}, generation "
            f"{'agrees' if self.generation_agrees else 'DIFFERS'}; "
            f"{self.tokens_checked} token ids compared; model read by {self.method}",
        ]
        return "\n".join(lines + [f"  - {p}" for p in self.problems])


def verify_gguf(
    model_dir: str | os.PathLike[str],
    gguf_path: str | os.PathLike[str],
    *,
    out_type: str,
    trust_remote_code: bool = False,
) -> GGUFVerifyReport:
    """Compare ``gguf_path`` with the HF model in ``model_dir`` (see the module docstring)."""
    if out_type not in OUT_TYPES:
        raise MergeError(f"unknown GGUF type {out_type!r}; use one of {', '.join(OUT_TYPES)}")
    with quiet():
        return _verify(Path(model_dir), Path(gguf_path), out_type, trust_remote_code)


def _verify(src: Path, path: Path, out_type: str, trust: bool = False) -> GGUFVerifyReport:
    from transformers import AutoTokenizer

    problems: list[str] = []
    hf_tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    ids = [prompt_ids(hf_tok, c) for c in chats]
    hf_config = read_config(src)
    family = family_of(hf_config)
    method = "transformers' GGUF loader" if family.hf_reader else READBACK
    seqs, ref, rounded = _reference(src, ids, out_type, family, hf_config, problems, trust)
    reader = gguf.GGUFReader(path)
    problems += _check_metadata(reader, hf_tok, hf_config)
    problems += check_hparams(reader, hf_config, family)
    problems += check_spm_scores(reader, hf_tok)
    try:
        checked, got_logits = _read_back(
            path, reader, hf_tok, hf_config, family, ids, seqs, problems
        )
    except Exception as exc:  # noqa: BLE001 - the reader rejecting the file fails the check
        problems.append(f"reading the file back with {method} failed: {type(exc).__name__}: "
                        f"{exc}")
        nan = float("nan")
        return GGUFVerifyReport(
            out_type, nan, nan, nan, nan, 0.0, False, 0, tuple(problems), False, method
        )
    scale = max(1.0, max(float(r.abs().max()) for r in ref))
    max_abs, rounding = _gap(got_logits, ref), _gap(rounded, ref)
    exact = _gap(got_logits, rounded)
    if out_type == "q8_0" and not is_moe(hf_config):
        tol = Q8_RTOL * scale
    else:  # MoE q8_0: the rounding flips near-tied routes (see the module docstring)
        tol = TOL_MULT * rounding + EXACT_RTOL * scale
    if not max_abs <= tol:  # written so that NaN fails
        problems.append(f"logits differ from the HF model by {max_abs:.3g} > {tol:.3g}")
    if not exact <= EXACT_RTOL * scale:
        problems.append(
            f"logits differ from the HF model with {out_type} rounding by {exact:.3g} > "
            f"{EXACT_RTOL * scale:.3g}: the file does not hold the rounded weights"
        )
    same, total, gen_ok = 0, 0, True
    for seq, p_ids, r, g in zip(seqs, ids, ref, got_logits, strict=True):
        ref_top, gg_top = r.argmax(-1), g.argmax(-1)
        same, total = same + int((ref_top == gg_top).sum()), total + len(seq)
        for pos in range(len(p_ids) - 1, len(seq) - 1):
            margin = float(r[pos, ref_top[pos]] - r[pos, gg_top[pos]])
            gen_ok &= margin <= 2 * tol  # 0 when the argmax agrees; NaN fails
    if not gen_ok:
        problems.append("greedy next token / generation differs from the HF model")
    return GGUFVerifyReport(
        out_type, max_abs, tol, rounding, exact, same / total, gen_ok, checked,
        tuple(problems), not problems, method,
    )


def _gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Max |a - b| over all sequences; NaN if any is NaN (Python's max() could drop it)."""
    return float(torch.stack([(x - y).abs().max() for x, y in zip(a, b, strict=True)]).max())


def _read_back(
    path: Path, reader: gguf.GGUFReader, hf_tok: Any, hf_config: dict[str, Any], family: Family,
    ids: list[list[int]], seqs: list[list[int]], problems: list[str],
) -> tuple[int, list[torch.Tensor]]:
    """The GGUF's tokenizer through transformers and its model through transformers (or our
    read-back): the prompts (``ids``: the HF tokenizer's) and a test string encoded by the GGUF
    tokenizer compared (differences appended to ``problems``), logits on ``seqs`` returned."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with _reader_dir(path) as (folder, name):
        # transformers' GGUF tokenizer reader: AutoTokenizer reads the config too (and refuses
        # architectures its loader lacks); the fast class reads only the tokenizer.* keys
        cls = AutoTokenizer if family.hf_reader else PreTrainedTokenizerFast
        gg_tok = cls.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        if _field(reader, "tokenizer.ggml.pre") == "smollm":
            _llama_cpp_smollm_split(gg_tok)
        pairs = [(p, want, prompt_ids(gg_tok, [{"role": "user", "content": p}]))
                 for p, want in zip(PROMPTS, ids, strict=True)]
        text = TOKENIZER_TEXT  # raw, with the special tokens the tokenizer adds (BOS?)
        pairs.append((text, hf_tok(text)["input_ids"], gg_tok(text)["input_ids"]))
        checked = 0
        for text, want, got in pairs:
            checked += len(want)
            if want != got:
                at = enumerate(zip(want, got, strict=False))
                i = next((i for i, (a, b) in at if a != b), min(len(want), len(got)))
                problems.append(
                    f"GGUF tokenizer: {text!r} -> ...{got[max(0, i - 2) : i + 4]} at token {i}, "
                    f"HF ...{want[max(0, i - 2) : i + 4]}"
                )
        if gg_tok.chat_template != hf_tok.chat_template:
            problems.append("the GGUF tokenizer's chat template differs from the HF one")
        for kind in ("bos", "eos"):
            a, b = getattr(gg_tok, f"{kind}_token_id"), getattr(hf_tok, f"{kind}_token_id")
            if a != b:
                problems.append(f"GGUF tokenizer {kind} id {a}, HF {b}")
        if family.hf_reader:
            model, cfg_problems = _load_gguf_model(folder, name, hf_config, family)
            problems += cfg_problems
        else:
            model = load_readback_model(reader, hf_config, family, problems)
        got = [_logits(model, s) for s in seqs]
        del model
        gc.collect()
    return checked, got


def _logits(model: PreTrainedModel, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].float()


def _reference(
    src: Path, prompt_ids: list[list[int]], out_type: str, family: Family,
    config: dict[str, Any], problems: list[str], trust: bool = False,
) -> tuple[list[list[int]], list[torch.Tensor], list[torch.Tensor]]:
    """Greedy continuations, the HF logits on them, then the logits with the export's rounding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(src), dtype=torch.float32, trust_remote_code=trust
    )
    seqs = []
    for ids in prompt_ids:
        seq = list(ids)
        for _ in range(GEN_TOKENS):
            seq.append(int(_logits(model, seq)[-1].argmax()))
        seqs.append(seq)
    ref = [_logits(model, s) for s in seqs]
    qtype = OUT_TYPES[out_type][0]
    names = gguf.get_tensor_name_map(family.arch, config["num_hidden_layers"])
    with torch.no_grad():
        for key, p in model.named_parameters():  # tied weights are one parameter: rounded once
            t = tensor_type(tuple(p.shape), qtype, gguf_name(names, key) or "")
            if t == gguf.GGMLQuantizationType.F32:
                continue  # 1-D: stays F32 in the file
            q = np.ascontiguousarray(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), t), t))
            if t == gguf.GGMLQuantizationType.Q8_0 and not within_q8_bound(p.numpy(), q):
                problems.append(f"the q8_0 quantiser rounds {key} beyond q8_0's own bound")
            p.copy_(torch.from_numpy(q.reshape(p.shape)))
    rounded = [_logits(model, s) for s in seqs]
    del model
    gc.collect()
    return seqs, ref, rounded


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _check_metadata(reader: gguf.GGUFReader, tok: Any, config: dict[str, Any]) -> list[str]:
    """What llama.cpp reads but transformers' loader ignores: template, eot, add_bos, rope."""
    problems = []
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if _field(reader, "tokenizer.chat_template") != template:
        problems.append("tokenizer.chat_template is missing or differs from the HF template")
    want = {"eos": tok.eos_token_id, "eot": end_of_turn_id(tok)}
    for kind, token_id in want.items():
        got = _field(reader, f"tokenizer.ggml.{kind}_token_id")
        if got != token_id:
            problems.append(f"tokenizer.ggml.{kind}_token_id is {got}, HF says {token_id}")
    add_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    if _field(reader, "tokenizer.ggml.add_bos_token") != add_bos:
        problems.append(f"tokenizer.ggml.add_bos_token is not {add_bos} (the HF tokenizer's)")
    rope, arch = rope_parameters(config), _field(reader, "general.architecture")
    if rope["rope_type"] in ("linear", "yarn"):
        kind = _field(reader, f"{arch}.rope.scaling.type")
        factor = _field(reader, f"{arch}.rope.scaling.factor") or 0.0
        if kind != rope["rope_type"] or not np.isclose(factor, rope["factor"], rtol=1e-6):
            problems.append(f"rope scaling {kind} x{factor} in the file, HF {rope}")
    freqs = rope_freqs(config)
    stored = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        problems += _check_llama3_rope(stored, config)
    elif stored is not None:
        problems.append("rope_freqs.weight written but the model has no llama3 rope scaling")
    return problems


def _check_llama3_rope(stored: Any, config: dict[str, Any]) -> list[str]:
    """llama.cpp divides each rotary frequency by rope_freqs; transformers' own llama3 rope
    must come out the same."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if stored is None:
        return ["llama3 rope scaling but no rope_freqs.weight tensor"]
    cfg = AutoConfig.for_model(**config)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    dim = theirs.numel() * 2
    base = 1.0 / rope_parameters(config)["rope_theta"] ** (np.arange(0, dim, 2) / dim)
    ours = base / np.asarray(stored.data, dtype=np.float64)
    if not np.allclose(ours, theirs.double().numpy(), rtol=1e-5):
        return ["rope_freqs.weight does not reproduce transformers' llama3 rope frequencies"]
    return []


@contextmanager
def _reader_dir(path: Path) -> Iterator[tuple[str, str]]:
    """A folder holding only a link to the file: transformers must not find the HF model's own
    config.json / tokenizer.json next to it and read those instead of the GGUF metadata. Its GGUF
    reader's progress bar (plain tqdm, which quiet() cannot turn off) is off meanwhile."""
    from transformers import modeling_gguf_pytorch_utils as reader

    name = "model.gguf"  # the file itself may still have its temp name
    bar = getattr(reader, "tqdm", None)
    with tempfile.TemporaryDirectory(prefix=".qorpo-gguf-verify-") as folder:
        try:
            os.symlink(path.resolve(), Path(folder) / name)
        except OSError:  # no symlinks (some filesystems): a hard link needs the same device
            os.link(path, Path(folder) / name)
        if bar is not None:
            reader.tqdm = lambda items, **kw: items
        try:
            yield folder, name
        finally:
            if bar is not None:
                reader.tqdm = bar


def _llama_cpp_smollm_split(tok: Any) -> None:
    """transformers' GGUF reader does not know llama.cpp's "smollm" pre-tokenizer (single digits,
    then the GPT-2 regex) and falls back to GPT-2's; apply llama.cpp's split so the check tests
    what llama.cpp will do."""
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )


def _load_gguf_model(
    folder: str, name: str, hf: dict[str, Any], family: Family
) -> tuple[Any, list[str]]:
    """The GGUF model through transformers, plus differences of its config from config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    problems = []
    for key in _CONFIG_KEYS:
        a, b = getattr(cfg, key, None), hf.get(key)
        if key == "num_key_value_heads":
            b = b or hf["num_attention_heads"]
        if key == "tie_word_embeddings":
            b = bool(b)
        if not (a == b or (isinstance(b, float) and np.isclose(a, b, rtol=1e-6))):
            problems.append(f"GGUF config {key}={a}, config.json {b}")
    rope = rope_parameters(hf)
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("full_attention", params).get("rope_theta")  # Gemma 3: per layer type
    if not np.isclose(theta or 0.0, rope["rope_theta"], rtol=1e-6):
        problems.append(f"GGUF rope theta {theta}, config.json {rope['rope_theta']}")
    if rope["rope_type"] != "default":
        # transformers' reader drops rope scaling (llama.cpp reads it: checked from the
        # metadata above); give the model the HF scaling so the logits are comparable.
        cfg.rope_parameters = {**cfg.rope_parameters, **rope}
    for key in family.hf_patch:  # what transformers' reader drops (see Family.hf_patch)
        if key in hf:
            setattr(cfg, key, hf[key])
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, config=cfg, dtype=torch.float32, trust_remote_code=False
    )
    return model.eval(), problems
