"""`qorpo.evaluate(...)`: score preference pairs with the base and each adapter, side by side."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qorpo.evaluation.inputs import EvalInputs, resolve, scored_set
from qorpo.evaluation.score import BASE, adapter_key, generate_all, load_models, score_all

# The table's rows: metric key (qorpo.trainer.eval_metrics) → label; higher is better for the
# first five.
ROWS = {"rewards/accuracy": "reward accuracy", "rewards/margin": "reward margin β(ℓw−ℓl)",
        "log_odds": "log odds ratio", "logps/chosen": "ℓ chosen (mean log-prob)",
        "logps/rejected": "ℓ rejected", "nll": "NLL of chosen", "ratio_loss": "L_OR",
        "loss": "ORPO loss (NLL + β·L_OR)"}


class EvalResult(NamedTuple):
    data: str  # what was scored
    pairs: int  # pairs scored
    rows_read: int
    dropped: dict[str, int]  # reason → rows (the length policy of training)
    settings: dict[str, Any]  # what decides the numbers
    models: list[dict[str, Any]]  # name, adapter (None: the base), metrics, delta (vs base)
    generations: list[dict[str, str]]  # prompt, then one reply per model name
    seconds: float
    peak_memory_gib: float | None
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return self._asdict()


def evaluate(model: str, adapters: list[str] | tuple[str, ...] = (), *, data: str | None = None,
             max_samples: int | None = None, generate: int = 0, max_new_tokens: int = 64,
             console: Console | None = None, **settings: Any) -> EvalResult:
    """Score pairs with the base `model` and each adapter (run or checkpoint folders). `model`
    may itself be a run or checkpoint folder (then its base is scored next to it) or a merged
    folder. Without `data`, a run's own eval set is scored. `settings`: TrainConfig fields
    (max_length, beta, quant, split, eval_fraction…), by default the first adapter's run's."""
    from qorpo.errors import ConfigError

    if max_samples is not None and max_samples < 1:
        raise ConfigError([f"--max-samples must be at least 1, got {max_samples}"])
    console = console or Console()
    start = time.perf_counter()
    inputs = resolve(str(model), [str(a) for a in adapters], {"data": data, **settings})
    for note in inputs.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    return _run(inputs, max_samples, generate, max_new_tokens, console, start)


def _run(inputs: EvalInputs, max_samples: int | None, generate: int, max_new_tokens: int,
         console: Console, start: float) -> EvalResult:
    from qorpo.api import choose_layout
    from qorpo.data.collate import PairCollator
    from qorpo.fitting import attention_cost
    from qorpo.memory.plan import peak_measured
    from qorpo.model import check_attn_implementation, choose_dtype, device_of_process

    cfg = inputs.cfg
    device = device_of_process()
    check_attn_implementation(cfg.attn_implementation, device)
    dtype = choose_dtype(cfg.dtype, device)
    data, report, source = _pairs(cfg, max_samples, console)
    model = load_models(cfg, inputs.adapters, device, dtype, console)
    layout, _ = choose_layout(model, cfg, device, console)
    collator = PairCollator(data.tokenizer_pad, layout=layout, sft_on_prompt=cfg.sft_on_prompt,
                            attention_cost=attention_cost(model))
    keys = [(BASE, inputs.base_name)] + [(adapter_key(i), a.name)
                                        for i, a in enumerate(inputs.adapters)]
    scores = score_all(model, data.pairs, collator, keys, cfg, device, console)
    gens = []
    if generate > 0:
        prompts = [list(data.pairs[i]["chosen_input_ids"][:data.pairs[i]["chosen_response_start"]])
                   for i in range(min(generate, len(data.pairs)))]
        gens = generate_all(model, data.tokenizer, prompts, keys, max_new_tokens, console)
    base = scores[BASE]
    models = [{"name": inputs.base_name, "adapter": None, "metrics": base, "delta": None}]
    for i, a in enumerate(inputs.adapters):
        m = scores[adapter_key(i)]
        models.append({"name": a.name, "adapter": str(a.path), "metrics": m,
                       "delta": {k: m[k] - base[k] for k in m}})
    peak = peak_measured(device.type)
    settings = {k: getattr(cfg, k) for k in ("model", "max_length", "max_prompt_length",
                                             "min_response_tokens", "beta", "sft_on_prompt",
                                             "quant", "batch_size", "chunk_size", "seed")}
    settings |= {"dtype": dtype.name, "layout": layout, "chat_template": cfg.chat_template}
    return EvalResult(source, len(data.pairs), report.rows_read,
                      {r: i.count for r, i in report.dropped.items()}, settings, models, gens,
                      time.perf_counter() - start, None if peak is None else peak / 2**30,
                      list(inputs.notes))


class _Scored(NamedTuple):
    pairs: Any  # datasets.Dataset of prepared pairs
    tokenizer: Any
    tokenizer_pad: int | None


def _pairs(cfg: Any, max_samples: int | None, console: Console) -> tuple[_Scored, Any, str]:
    """The prepared pairs to score (the training pipeline: template, length policy, drops) and
    their report."""
    from qorpo.data.prepare import prepare_data
    from qorpo.model import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    scored, held_out = scored_set(cfg)
    if not held_out and max_samples is not None:
        scored = dataclasses.replace(scored, max_samples=max_samples)  # read only those rows
    prepared = prepare_data(scored, tokenizer)
    pairs, report = ((prepared.eval, prepared.eval_report) if held_out
                     else (prepared.train, prepared.train_report))
    if held_out and max_samples is not None and max_samples < len(pairs):
        pairs = pairs.select(range(max_samples))
    console.print(report.table())
    return _Scored(pairs, tokenizer, tokenizer.pad_token_id), report, report.source


def _fmt(key: str, value: float) -> str:
    return f"{value:.3f}" if key == "rewards/accuracy" else f"{value:.4f}"


def eval_table(result: EvalResult) -> Table:
    """Metrics (rows) per model (columns), each adapter with its difference to the base."""
    dropped = sum(result.dropped.values())
    t = Table(title=f"qorpo eval: {escape(result.data)} — {result.pairs} pairs scored"
                    + (f", {dropped} dropped" if dropped else ""), title_justify="left")
    t.add_column("metric")
    for m in result.models:
        t.add_column(escape(m["name"]), justify="right")
    for key, label in ROWS.items():
        cells = []
        for m in result.models:
            cell = _fmt(key, m["metrics"][key])
            if m["delta"] is not None:
                delta = m["delta"][key]
                cell += f" ({'+' if delta >= 0 else '−'}{_fmt(key, abs(delta))})"
            cells.append(cell)
        t.add_row(label, *cells)
    s = result.settings
    t.caption = (f"{s['quant']} {s['dtype']}, max_length {s['max_length']}, β {s['beta']:g}, "
                 f"{s['layout']} layout; (±) = difference to the base; "
                 f"{result.seconds:.0f} s" + (f", peak memory {result.peak_memory_gib:.2f} GiB"
                                              if result.peak_memory_gib is not None else ""))
    return t


def generations_table(result: EvalResult, width: int = 300) -> Table:
    """Greedy replies side by side: one row per prompt, one column per model."""
    names = [m["name"] for m in result.models]
    t = Table(title="greedy replies to held-out prompts", title_justify="left", show_lines=True)
    t.add_column("prompt (end)")
    for name in names:
        t.add_column(escape(name))
    for g in result.generations:
        prompt = g["prompt"] if len(g["prompt"]) <= width else "…" + g["prompt"][-width:]
        t.add_row(escape(prompt), *(escape(g[n]) for n in names))
    return t
