"""`qorpo estimate`'s options as one config object (torch-free): its CLI flags, the Python API's
keywords (qorpo.memory.plan.estimate_run) and the docs' table come from these fields, as
`qorpo train`'s come from TrainConfig."""

from __future__ import annotations

from dataclasses import dataclass

from qorpo.config import TrainConfig
from qorpo.errors import ConfigError
from qorpo.options import Options, choice_problems, option
from qorpo.validation import memory_size_problems

__all__ = ["DEFAULT_MAX_LENGTH", "DEVICES", "EstimateConfig"]

# qorpo train's defaults (a dataclass field's default is its class attribute): the estimate
# plans the run `qorpo train` would make.
DEFAULT_MAX_LENGTH: int = TrainConfig.max_length
DEVICES = ("cuda", "cpu")


@dataclass
class EstimateConfig(Options):
    """What `qorpo estimate` plans for: a model (its config.json alone), pairs of max_length
    tokens (the worst case: no data yet), a device."""

    model: str | None = option(None, "Run", "Hub id or local folder: only its config.json is "
                               "read. Required.")
    max_length: int | None = option(None, "Run", "Max tokens of prompt + response (default: "
                                    f"{DEFAULT_MAX_LENGTH}, or the model's context where "
                                    "shorter).")
    batch_size: int = option(1, "Run", "Preference pairs per micro-batch.")
    lora_r: int = option(TrainConfig.lora_r, "Run", "LoRA rank.")
    packing: bool = option(True, "Run", "Layout planned for: packed rows, or padded ones.")
    gpu_memory: str | None = option(None, "Device", "Plan for a GPU of this size, e.g. 16GB "
                                    "(default: the device found).")
    device: str | None = option(None, "Device", "cuda or cpu (default: cuda when --gpu-memory "
                                "is given or a GPU is found).", DEVICES)
    low_cpu_memory: bool | None = option(
        None, "Device", "CPU: plan with glibc's thresholds pinned, or with its default "
        "allocator (default: pinned only when the default could outgrow the RAM, as qorpo "
        "train decides).")

    def validate(self) -> EstimateConfig:
        """Every bad value at once (one ConfigError), as `qorpo train` reports its config."""
        problems = [] if self.model else ["model: required: a hub id or a local model folder "
                                          "(--model)"]
        problems += [f"{name}: must be at least 1, got {value}" for name, value in
                     (("max_length", self.max_length), ("batch_size", self.batch_size),
                      ("lora_r", self.lora_r)) if value is not None and value < 1]
        problems += choice_problems(self)  # device
        problems += memory_size_problems("gpu_memory", self.gpu_memory)
        if problems:
            raise ConfigError(problems)
        return self

    @property
    def layout(self) -> str:
        """The batch layout planned for (qorpo.data.collate)."""
        return "packed" if self.packing else "padded"
