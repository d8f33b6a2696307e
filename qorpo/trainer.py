"""ORPOTrainer: a transformers.Trainer that overrides public hooks (and one protected one).

compute_loss        one forward over the laid-out pairs (padded, shared or packed; see
                    qorpo.data.collate) → final hidden states → chunked loss on the scored tokens
get_batch_samples   counts the pairs and SFT tokens of the whole accumulation window, so k
                    micro-batches of b pairs give exactly the gradient of one batch of k·b pairs
prediction_step     per-pair statistics; compute_metrics (eval_metrics) turns the statistics
                    the Trainer gathered from every process (padding duplicates dropped) into
                    the eval loss and metrics of the whole eval set
log                 adds the ORPO metrics, tokens/s and peak memory to what the Trainer logs;
                    under torchrun/accelerate they are summed over all processes first
_get_train_sampler  (protected: no public argument sets the train sampler) the length-grouped
                    order of each epoch is a function of (seed, epoch), so a resume is exact

Metrics are summed on the device as they come (no host sync per micro-batch) and read once per
log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

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


class ORPOTrainingArguments(TrainingArguments):
    """TrainingArguments whose warm-up always leaves the last step a nonzero learning rate."""

    def get_warmup_steps(self, num_training_steps: int) -> int:
        # The warm-up gives step 0 the rate 0; a run of only warm-up steps (ceil(0.1 * 1) = 1
        # for --max-steps 1) would end with the adapter untrained. Capped at steps - 1, which
        # changes only runs shorter than 1 / (1 - warmup_ratio) steps (1 step at 10%).
        steps = super().get_warmup_steps(num_training_steps)
        return min(steps, max(num_training_steps - 1, 0))


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """Transformers' LengthGroupedSampler (megabatches of similar lengths), its shuffle drawn
    from a generator seeded with seed + the epoch that `epoch()` gives when iteration starts,
    not from the global RNG. (The epoch is read, not set through set_epoch: accelerate's
    set_epoch does not reach the sampler of a loader that skips batches across processes.)"""

    def __init__(self, batch_size: int, lengths: list[int], seed: int,
                 epoch: Callable[[], int]) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch())
        return iter(get_length_grouped_indices(self.lengths, self.batch_size,
                                               generator=generator))


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

    # -------------------------------------------------------------------- data order
    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        # Overridden (a protected hook: no public argument sets the train sampler) because the
        # Trainer's LengthGroupedSampler shuffles with the global RNG when an epoch starts. A
        # resume inside epoch 2+ starts that epoch (and skips its first batches) before the
        # checkpoint's RNG state is restored, so it drew the order from the RNG as set_seed
        # left it: epoch 1's order, not the epoch's own, and the resumed run diverged.
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            # state.epoch when an epoch's batches start: e.0 in an unbroken run, e + the
            # fraction done when resumed inside epoch e (the state comes from the checkpoint)
            return EpochLengthGroupedSampler(sampler.batch_size, list(sampler.lengths), seed,
                                             epoch=lambda: int(self.state.epoch or 0))
        return sampler

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
                           for k in _SUMS]).detach()  # metrics only: keep no autograd graph
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


def whole_run_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """Mean loss per step over the whole run, a resumed one included: each logged loss is the
    mean of the steps since the previous log (qorpo logs at every checkpoint and at the end,
    so no step is left out); records repeated by a resume are counted once."""
    by_step = {int(r["step"]): float(r["loss"]) for r in log_history if "loss" in r}
    total, previous = 0.0, 0
    for step in sorted(by_step):
        total += by_step[step] * (step - previous)
        previous = step
    return total / previous if previous else None


class MetricsFileCallback(TrainerCallback):
    """Appends every log (train and eval) to OUTPUT_DIR/metrics.jsonl as one JSON object."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "time": time.time(), **logs}
            # The Trainer's train_loss covers only the steps of this train() call; after a
            # resume the log history (restored from the checkpoint) has all of them.
            whole_run = whole_run_train_loss(state.log_history) if "train_loss" in logs else None
            if whole_run is not None:
                record["train_loss"] = whole_run
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class CheckpointCallback(TrainerCallback):
    """Makes checkpoints trustworthy for --resume.

    * Every checkpoint step is also a logging step (and so is the last step), so the losses of
      all steps up to a checkpoint are in its log history: a resumed run reports the whole run's
      train loss, not only its own steps.
    * After the Trainer has written everything into checkpoint-N, the marker goes in last
      (with the run's fingerprint): a checkpoint without it was cut short and is never resumed.
    * A resume logs, saves and evaluates at this run's intervals: they are not part of the
      fingerprint, so a resume may change them.
    """

    def __init__(self, fingerprint: dict[str, Any]) -> None:
        self.fingerprint = fingerprint

    def on_train_begin(self, args, state, control, **kwargs):
        # The Trainer loads trainer_state.json (with the checkpoint's logging/save/eval steps)
        # before this event and then reads the intervals from the state, not from args.
        state.compute_steps(args, state.max_steps)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        if control.should_save and state.is_world_process_zero:
            from qorpo.runs import record_written

            # listed before the Trainer writes it: --overwrite removes only checkpoint folders
            # this run wrote, even one cut short by a kill (no marker yet)
            record_written(Path(args.output_dir), [f"checkpoint-{state.global_step}"])
        return control

    def on_save(self, args, state, control, **kwargs):
        if _distributed():
            dist.barrier()  # every rank has written its part (rng_state_N.pth) first
        if state.is_world_process_zero:
            from qorpo.runs import mark_checkpoint

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            mark_checkpoint(folder, self.fingerprint, state.global_step)

