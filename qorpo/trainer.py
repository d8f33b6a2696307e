"""ORPOTrainer: a transformers.Trainer that overrides public hooks only.

compute_loss        one forward over the laid-out pairs (padded, shared or packed; see
                    qorpo.data.collate) → final hidden states → chunked loss on the scored tokens
get_batch_samples   counts the pairs and SFT tokens of the whole accumulation window, so k
                    micro-batches of b pairs give exactly the gradient of one batch of k·b pairs
prediction_step     per-pair statistics; compute_metrics (eval_metrics) turns the statistics
                    the Trainer gathered from every process (padding duplicates dropped) into
                    the eval loss and metrics of the whole eval set
log                 adds the ORPO metrics, tokens/s and peak memory to what the Trainer logs;
                    under torchrun/accelerate they are summed over all processes first

Metrics are summed on the device as they come (no host sync per micro-batch) and read once per
log.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import EvalPrediction, Trainer, TrainerCallback

from qorpo.config import DEFAULT_CHUNK_SIZE
from qorpo.data.collate import Batch
from qorpo.errors import NonFiniteLossError
from qorpo.forward import hidden_states
from qorpo.loss import ORPOOutput, PairLogps, orpo_loss, score_logps
from qorpo.model import output_head

# Logged as means over pairs: name in the logs → field of ORPOOutput (per-pair or scalar)
_PAIR_METRICS = {
    "log_odds": "log_odds", "logps/chosen": "chosen_logps", "logps/rejected": "rejected_logps",
    "rewards/chosen": "chosen_rewards", "rewards/rejected": "rejected_rewards",
}
# Train metrics: one float64 vector of sums in this order (all-reduced as one tensor).
_MEANS = ("ratio_loss", "rewards/accuracy", "rewards/margin", *_PAIR_METRICS)
_SUMS = ("pairs", "nll", "tokens", *_MEANS)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ORPOTrainer(Trainer):
    # compute_loss normalises by the window totals itself; the Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, beta: float = 0.1, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 **kwargs: Any) -> None:
        kwargs.setdefault("compute_metrics", partial(eval_metrics, beta=beta))
        super().__init__(*args, **kwargs)
        self.beta, self.chunk_size = beta, chunk_size
        self.window_pairs: int | None = None
        self.window_tokens: int | None = None
        self.sums: torch.Tensor | None = None  # train metric sums since the last log (_SUMS)
        self.windows_since_log = 0  # optimizer steps (accumulation windows) since the last log
        self.last_log_time = time.perf_counter()

    # -------------------------------------------------------------------- accumulation window
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.window_pairs is None:  # first window of this train(): time from here, not
            self.last_log_time = time.perf_counter()  # from init (eval may have run since)
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        # counted by the collator on the CPU: no device sync here
        totals = torch.tensor([sum(b["num_pairs"] for b in batches),
                               sum(b["num_sft_tokens"] for b in batches)], dtype=torch.float64)
        if _distributed():
            totals = totals.to(device)
            dist.all_reduce(totals)  # the big batch spans every device
        self.window_pairs, self.window_tokens = int(totals[0]), max(int(totals[1]), 1)
        self.windows_since_log += 1
        return batches, num_items

    # -------------------------------------------------------------------- the loss
    def pair_logps(self, model: torch.nn.Module, inputs: dict[str, Any]) -> PairLogps:
        batch = Batch.from_dict(inputs)
        return score_logps(hidden_states(model, batch), batch.spec, output_head(model),
                           self.chunk_size)

    def orpo_forward(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                     num_pairs: int | None = None,
                     num_tokens: int | None = None) -> ORPOOutput:
        return orpo_loss(self.pair_logps(model, inputs), beta=self.beta, num_pairs=num_pairs,
                         num_nll_tokens=num_tokens)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training and self.window_pairs is not None
        out = self.orpo_forward(model, inputs, self.window_pairs if training else None,
                                self.window_tokens if training else None)
        loss = out.loss
        if not torch.isfinite(loss.detach()):
            rows = inputs["row"].tolist() if "row" in inputs else "?"
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) in step {self.state.global_step + 1}, batch rows "
                f"{rows} (nll {out.nll.item():.4g}, ratio loss {out.ratio_loss.item():.4g}). "
                "Stopping. Try a lower --learning-rate, --dtype fp32/bf16, or check those rows.")
        if training:
            self._accumulate(out, inputs)
            if self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients over devices
        return (loss, out) if return_outputs else loss

    def _accumulate(self, out: ORPOOutput, inputs: dict[str, torch.Tensor]) -> None:
        pairs = out.chosen_logps.shape[0]
        # out.nll is this micro-batch's share of the window's token-mean NLL: summing the shares
        # (over micro-batches and devices) and dividing by the number of windows gives the mean
        # NLL per step.
        vals = {"pairs": pairs, "nll": out.nll.detach(), "tokens": inputs["unique_tokens"],
                "ratio_loss": out.ratio_loss * pairs,
                "rewards/accuracy": out.reward_accuracy * pairs,
                "rewards/margin": out.reward_margin * pairs}
        vals |= {name: getattr(out, field).float().sum() for name, field in _PAIR_METRICS.items()}
        device = out.loss.device
        row = torch.stack([torch.as_tensor(vals[k], dtype=torch.float64, device=device)
                           for k in _SUMS])
        self.sums = row if self.sums is None else self.sums + row

    def _train_means(self) -> dict[str, float]:
        """Train metrics since the last log, over every process (all ranks log together)."""
        sums = self.sums
        self.sums = None
        if sums is None:
            sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=self.args.device)
        if _distributed():
            dist.all_reduce(sums)
        totals = dict(zip(_SUMS, sums.tolist(), strict=True))
        now = time.perf_counter()
        out = {"tokens_per_second": totals["tokens"] / max(now - self.last_log_time, 1e-9)}
        if totals["pairs"]:
            out |= {k: totals[k] / totals["pairs"] for k in _MEANS}
        if self.windows_since_log:
            out["nll"] = totals["nll"] / self.windows_since_log
        self.windows_since_log, self.last_log_time = 0, now
        return out

    # -------------------------------------------------------------------- evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v.to(self.args.device) if torch.is_tensor(v) else v
                  for k, v in inputs.items()}
        with torch.no_grad():
            logps = self.pair_logps(model, inputs)
            out = orpo_loss(logps, beta=self.beta)
        stats = torch.stack([out.chosen_logps, out.rejected_logps, out.log_odds,
                             logps.nll_sums, logps.nll_counts.float()], dim=1)  # (B, 5)
        # No per-batch loss: the Trainer would average batch means, which depends on the eval
        # batch size (and the process count); eval_metrics computes the loss of the whole set.
        # The Trainer computes metrics only when "labels" come back too: the data rows.
        return None, stats, inputs["row"]

    # -------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs.update(self._train_means())
            if torch.cuda.is_available():
                logs["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        super().log(logs, start_time)


def eval_metrics(pred: EvalPrediction, beta: float) -> dict[str, float]:
    """ORPO metrics from the per-pair statistics of every eval pair (prediction_step's columns:
    ℓw, ℓl, log odds ratio, NLL sum, NLL tokens), each pair counted once."""
    stats = torch.as_tensor(pred.predictions, dtype=torch.float64)  # (N, 5)
    lw, ll, log_odds, nll_sum, nll_count = stats.unbind(1)
    nll = nll_sum.sum() / nll_count.sum().clamp(min=1)
    ratio_loss = -torch.nn.functional.logsigmoid(log_odds).mean()
    return {
        "loss": float(nll + beta * ratio_loss),  # the ORPO loss of the whole eval set
        "nll": float(nll), "ratio_loss": float(ratio_loss),
        "rewards/accuracy": float((lw > ll).double().mean()),
        "rewards/margin": float((beta * (lw - ll)).mean()),
        "log_odds": float(log_odds.mean()),
        "logps/chosen": float(lw.mean()), "logps/rejected": float(ll.mean()),
        "rewards/chosen": float(beta * lw.mean()), "rewards/rejected": float(beta * ll.mean()),
    }


class MetricsFileCallback(TrainerCallback):
    """Appends every log (train and eval) to OUTPUT_DIR/metrics.jsonl as one JSON object."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "time": time.time(), **logs}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class CheckpointCallback(TrainerCallback):
    """Makes checkpoints trustworthy for --resume.

    * Every checkpoint step is also a logging step (and so is the last step), so the losses of
      all steps up to a checkpoint are in its log history: a resumed run reports the whole run's
      train loss, not only its own steps.
    * After the Trainer has written everything into checkpoint-N, the marker goes in last
      (with the run's fingerprint): a checkpoint without it was cut short and is never resumed.
    """

    def __init__(self, fingerprint: dict[str, Any]) -> None:
        self.fingerprint = fingerprint

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if _distributed():
            dist.barrier()  # every rank has written its part (rng_state_N.pth) first
        if state.is_world_process_zero:
            from qorpo.runs import mark_checkpoint

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            mark_checkpoint(folder, self.fingerprint, state.global_step)

