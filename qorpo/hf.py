"""Small bridges to Hugging Face libraries, one of each: quiet loading, dtype names, the tokens
that end a reply (eos, the chat template's end-of-turn), and a greedy chat reply encoded exactly
as training encodes prompts."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

# bitsandbytes (>= 0.50, on CPUs with AVX512-BF16) tries at import to fetch a CPU 4-bit kernel
# from the hub through `kernels` (a transformers dependency since 5.25); `kernels` refuses it
# (unverified publisher) or it is offline, bitsandbytes falls back to its own kernel, and logs
# "Failed to load … please pip install kernels" to every run's stderr. qorpo asks for no hub code.
# Offline, `kernels` first logs that it skips that publisher check: the same noise.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# Short names (CLI, configs, reports) -> torch dtypes and the names config.json uses.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16,
                                  "fp32": torch.float32}
CONFIG_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def short_dtype_name(config_name: Any) -> str | None:
    """'bfloat16' / 'torch.float16' (a config.json dtype) -> 'bf16' / 'fp16'; None if other."""
    if not isinstance(config_name, str):
        return None
    plain = config_name.removeprefix("torch.")
    return next((short for short, name in CONFIG_NAMES.items() if name == plain), None)


def text_config(config: Any) -> Any:
    """The language model's config: a multimodal config's text part (Gemma 3, Llava), else the
    config itself. The one place qorpo asks transformers for it."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No tqdm bars (they garble rich output; qorpo shows its own status) and no library
    deprecation noise (v6 renames, peft internals) that users cannot act on."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning,
                                    module=r"(transformers|peft|bitsandbytes|accelerate)\b")
            yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class Reply(NamedTuple):
    text: str
    stopped: bool  # ended at an end-of-turn/EOS token, not at max_new_tokens


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a reply: the generation config's, else the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token that ends an assistant turn under the chat template (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>): a one-turn conversation is
    rendered and the first token after the assistant's text is taken, if it is a special one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "qorpo end-of-turn marker"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except Exception:  # noqa: BLE001 - odd templates: callers fall back to eos
        return None
    tail = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return ids[0] if ids and ids[0] in special else None


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: eos, plus the chat template's end-of-turn token."""
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def greedy_reply(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 48) -> Reply:
    """Greedy reply to one user turn; the prompt is encoded as training encodes it (chat
    template, one BOS, no response)."""
    from qorpo.data.encode import prompt_ids

    input_ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": prompt}])],
                             device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    new = out[0, input_ids.shape[1]:].tolist()
    stopped = bool(new) and new[-1] in eos_ids(model, tokenizer)
    return Reply(tokenizer.decode(new, skip_special_tokens=True).strip(), stopped)
