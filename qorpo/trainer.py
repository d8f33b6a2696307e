"""ORPOTrainer: a transformers.Trainer that overrides public hooks only.

compute_loss        one forward over chosen+rejected (2B, T) → final hidden states → chunked loss
get_batch_samples   counts the pairs and SFT tokens of the whole accumulation window, so k
                    micro-batches of b pairs give exactly the gradient of one batch of k·b pairs
prediction_step     eval loss + ORPO metrics
log                 adds the ORPO metrics, tokens/s and peak memory to what the Trainer logs
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from qorpo.config import DEFAULT_CHUNK_SIZE
from qorpo.errors import NonFiniteLossError
from qorpo.loss import ORPOOutput, orpo_loss, pair_logps
from qorpo.model import final_hidden_states, output_head

# Logged as means over pairs: name in the logs → field of ORPOOutput (per-pair or scalar)
_PAIR_METRICS = {
    "log_odds": "log_odds", "logps/chosen": "chosen_logps", "logps/rejected": "rejected_logps",
    "rewards/chosen": "chosen_rewards", "rewards/rejected": "rejected_rewards",
}


class ORPOTrainer(Trainer):
    # compute_loss normalises by the window totals itself; the Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, beta: float = 0.1, sft_on_prompt: bool = False,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta, self.sft_on_prompt, self.chunk_size = beta, sft_on_prompt, chunk_size
        self.window_pairs: int | None = None
        self.window_tokens: int | None = None
        self.metric_sums: dict[str, dict[str, float]] = {
            "train": defaultdict(float), "eval": defaultdict(float)}
        self.tokens_since_log = 0
        self.last_log_time = time.perf_counter()

    # -------------------------------------------------------------------- accumulation window
    def _sft_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        b = batch["input_ids"].shape[0] // 2
        mask = batch["attention_mask"] if self.sft_on_prompt else batch["response_mask"]
        return int(mask[:b, 1:].sum())

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.window_pairs is None:  # first window of this train(): time from here, not
            self.last_log_time = time.perf_counter()  # from init (eval may have run since)
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        totals = torch.tensor([sum(b["input_ids"].shape[0] // 2 for b in batches),
                               sum(self._sft_tokens(b) for b in batches)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            totals = totals.to(device)
            dist.all_reduce(totals)  # the big batch spans every device
        self.window_pairs, self.window_tokens = int(totals[0]), max(int(totals[1]), 1)
        self.metric_sums["train"]["windows"] += 1
        return batches, num_items

    # -------------------------------------------------------------------- the loss
    def orpo_forward(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                     num_pairs: int | None = None,
                     num_tokens: int | None = None) -> ORPOOutput:
        hidden = final_hidden_states(model, inputs["input_ids"], inputs["attention_mask"])
        logps = pair_logps(hidden, inputs["input_ids"], inputs["response_mask"],
                           output_head(model), attention_mask=inputs["attention_mask"],
                           sft_on_prompt=self.sft_on_prompt, chunk_size=self.chunk_size)
        return orpo_loss(logps, beta=self.beta, num_pairs=num_pairs, num_nll_tokens=num_tokens)

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
            self._accumulate("train", out, inputs)
            if self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients over devices
        return (loss, out) if return_outputs else loss

    def _accumulate(self, split: str, out: ORPOOutput, inputs: dict[str, torch.Tensor]) -> None:
        sums, pairs = self.metric_sums[split], out.chosen_logps.shape[0]
        sums["pairs"] += pairs
        if split == "train":
            # out.nll is this micro-batch's share of the window's token-mean NLL: summing the
            # shares and dividing by the number of windows gives the mean NLL per step.
            sums["nll"] += out.nll.item()
            self.tokens_since_log += int(inputs["attention_mask"].sum())
        else:
            tokens = self._sft_tokens(inputs)
            sums["nll"] += out.nll.item() * tokens
            sums["nll_tokens"] += tokens
        sums["ratio_loss"] += out.ratio_loss.item() * pairs
        sums["rewards/accuracy"] += out.reward_accuracy.item() * pairs
        sums["rewards/margin"] += out.reward_margin.item() * pairs
        for name, field in _PAIR_METRICS.items():
            sums[name] += getattr(out, field).float().sum().item()

    # -------------------------------------------------------------------- evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v.to(self.args.device) if torch.is_tensor(v) else v
                  for k, v in inputs.items()}
        with torch.no_grad():
            out = self.orpo_forward(model, inputs)
        self._accumulate("eval", out, inputs)
        return out.loss.detach(), None, None

    # -------------------------------------------------------------------- logging
    def _flush(self, split: str) -> dict[str, float]:
        sums = self.metric_sums[split]
        pairs, nll = sums.pop("pairs", 0.0), sums.pop("nll", 0.0)
        per = sums.pop("windows", 0.0) if split == "train" else sums.pop("nll_tokens", 0.0)
        out = {k: v / pairs for k, v in sums.items()} if pairs else {}
        if pairs and per:
            out["nll"] = nll / per
        sums.clear()
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        is_eval = any(k.startswith("eval_") for k in logs)
        if is_eval:
            logs.update({f"eval_{k}": v for k, v in self._flush("eval").items()})
        elif "loss" in logs:
            logs.update(self._flush("train"))
            now = time.perf_counter()
            logs["tokens_per_second"] = self.tokens_since_log / max(now - self.last_log_time,
                                                                    1e-9)
            self.tokens_since_log, self.last_log_time = 0, now
            if torch.cuda.is_available():
                logs["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        super().log(logs, start_time)


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
        if state.is_world_process_zero:
            from qorpo.runs import mark_checkpoint

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            mark_checkpoint(folder, self.fingerprint, state.global_step)

