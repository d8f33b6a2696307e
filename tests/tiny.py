"""Tiny offline models and tokenizers for tests and benchmarks.

Everything is built from a config and saved to a folder, then loaded back through the same
`from_pretrained` code path a hub id takes. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a preference pair has a chosen and a rejected answer",
    "Hello there! How are you today? I am fine, thank you.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "User: what is 2 + 2?\nAssistant: 2 + 2 = 4.",
    "The answer is yes. The answer is no. Answers should be polite and short.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "system user assistant human gpt\n\n",
]


def make_tokenizer(
    out_dir: str | Path | None = None,
    *,
    vocab_size: int = 320,
    chat_template: str | None = CHATML_TEMPLATE,
    pad_is_eos: bool = False,
    add_bos: bool = False,
) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (so merges across a prompt/response boundary happen)."""
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    if add_bos:
        from tokenizers import processors

        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>" if chat_template else "</s>",
        pad_token=None if pad_is_eos else "<pad>",
        unk_token=None,
    )
    if pad_is_eos:
        hf.pad_token = hf.eos_token
    hf.add_bos_token = add_bos  # informational for templates
    if chat_template is not None:
        hf.chat_template = chat_template
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def make_model(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    vocab_size: int = 320,
    hidden_size: int = 64,
    layers: int = 2,
    tie: bool = False,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    max_shard_size: str | None = None,
    **overrides: object,
) -> Path:
    """Build a tiny random causal LM from a config, save it (safetensors) and return its folder."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    common.update(overrides)
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init is tiny in std; scale it up a bit so logits are not all near-uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    out = Path(out_dir)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **kwargs)
    (tokenizer or make_tokenizer(vocab_size=vocab_size)).save_pretrained(str(out))
    return out
