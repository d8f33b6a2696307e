"""Scoring held-out pairs with the training loss path: the 4-bit base loaded once, LoRA adapters
loaded next to each other by name and switched (the base: adapters disabled), each micro-batch
laid out by the training collator and scored by the trainer's chunked log-probs. The per-pair
statistics are the trainer's (`ORPOTrainer.prediction_step`) and turned into metrics by the
same function (`qorpo.trainer.eval_metrics`), so `qorpo eval` and the trainer's own eval agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qorpo.errors import ModelError
from qorpo.evaluation.inputs import Adapter

BASE = "__base__"  # the key of the base model's scores


def adapter_key(i: int) -> str:
    return f"qorpo_eval_{i}"


def load_models(cfg: Any, adapters: list[Adapter], device: torch.device, dtype: Any,
                console: Console) -> Any:
    """The base, prepared as training prepares it (qorpo.model.add_lora: k-bit preparation, the
    dtype of each part), with every adapter loaded next to it by name."""
    from qorpo.hf import quiet
    from qorpo.model import add_lora, load_base_model

    with console.status(f"Loading {cfg.model} ({cfg.quant}, {dtype.name})…"):
        model = add_lora(load_base_model(cfg, dtype.dtype, device), cfg, dtype.dtype)
        for i, adapter in enumerate(adapters):
            try:
                with quiet():
                    model.load_adapter(str(adapter.path), adapter_name=adapter_key(i),
                                       is_trainable=False)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                raise ModelError(f"--adapter {adapter.name} does not load onto {cfg.model}: "
                                 f"{first or type(exc).__name__}") from exc
    model.eval()
    return model


@contextlib.contextmanager
def active(model: Any, key: str) -> Iterator[None]:
    """The base (adapters disabled) or one adapter, for the duration."""
    if key == BASE:
        with model.disable_adapter():
            yield
        return
    model.set_adapter(key)
    yield


def pair_stats(model: Any, batch: Any, beta: float, chunk_size: int) -> torch.Tensor:
    """(B, 5) per-pair statistics, ORPOTrainer.prediction_step's columns: ℓw, ℓl, log odds
    ratio, NLL sum, NLL tokens."""
    from qorpo.forward import hidden_states
    from qorpo.loss import orpo_loss, score_logps
    from qorpo.model import output_head

    logps = score_logps(hidden_states(model, batch), batch.spec, output_head(model), chunk_size)
    out = orpo_loss(logps, beta=beta)
    return torch.stack([out.chosen_logps, out.rejected_logps, out.log_odds,
                        logps.nll_sums, logps.nll_counts.float()], dim=1)


def score_all(model: Any, data: Any, collator: Any, keys: list[tuple[str, str]], cfg: Any,
              device: torch.device, console: Console) -> dict[str, dict[str, float]]:
    """Metrics per model key over every pair of `data` (batches of --batch-size pairs in data
    order, as the trainer's eval loader gives them)."""
    from transformers import EvalPrediction

    from qorpo.data.collate import Batch
    from qorpo.forward import evaluating, mixed_precision
    from qorpo.trainer import eval_metrics

    n = len(data)
    batches = [range(i, min(i + cfg.batch_size, n)) for i in range(0, n, cfg.batch_size)]
    results: dict[str, dict[str, float]] = {}
    progress = Progress(TextColumn("[bold]scoring {task.fields[what]}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("pairs"), TimeElapsedColumn(),
                        console=console, transient=True)
    with progress:
        for key, label in keys:
            task = progress.add_task("score", total=n, what=label)
            stats = []
            with active(model, key), evaluating(model), mixed_precision(model):
                for idx in batches:
                    batch = Batch.from_dict(collator([data[i] for i in idx])).to(device)
                    stats.append(pair_stats(model, batch, cfg.beta, cfg.chunk_size).cpu())
                    progress.advance(task, len(idx))
            table = torch.cat(stats).float().numpy()
            results[key] = eval_metrics(EvalPrediction(predictions=table, label_ids=None),
                                        beta=cfg.beta)
            progress.remove_task(task)
    return results


def generate_all(model: Any, tokenizer: Any, prompts: list[list[int]],
                 keys: list[tuple[str, str]], max_new_tokens: int,
                 console: Console) -> list[dict[str, str]]:
    """Greedy replies to each prompt (token ids exactly as scored) from every model key."""
    from qorpo.attention.choice import for_generation
    from qorpo.forward import mixed_precision

    out: list[dict[str, str]] = [
        {"prompt": tokenizer.decode(ids, skip_special_tokens=True).strip()} for ids in prompts]
    with console.status("Generating…"):
        for key, label in keys:
            with active(model, key), for_generation(model), mixed_precision(model):
                for row, ids in zip(out, prompts, strict=True):
                    row[label] = greedy_from_ids(model, tokenizer, ids, max_new_tokens)
    return out


def greedy_from_ids(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int) -> str:
    """Greedy reply to a prompt given as token ids (qorpo.hf.greedy_reply's settings)."""
    input_ids = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        new = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
    return tokenizer.decode(new.tolist(), skip_special_tokens=True).strip()
