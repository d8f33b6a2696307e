"""Which attention kernel a shared/packed run uses, and the check that it trains on this device.

A masked SDPA call computes every block of a row and then masks it; in qorpo's layouts that is
the upper triangle, rejected queries against chosen keys and, in a packed row, every pair
against every other. Where it can, qorpo runs a kernel that skips those blocks instead:

* CPU: qorpo.attention.pairs' per-pair SDPA calls (`qorpo_pairs`), measured 1.2-1.3x per step.
* CUDA: FlexAttention with a BlockMask (`flex_attention`, Triton kernels compiled by
  torch.compile on first use). The mask is a few bytes per 128 x 128 block instead of a dense
  rows x length^2 tensor, and the kernels skip the blocks it rules out.

FlexAttention is preferred, not assumed: its backward kernel does not compile on every GPU
(e.g. it needs more shared memory per block than RTX 3090/4090/A10G-class cards have at some
head sizes: pytorch/pytorch#133254, #198224). So before the run starts, `choose` runs one
forward and backward of a small packed batch through the model as it will train (compiling
both kernels for rows like the run's), compares the layout's hidden states with the padded
layout's, and falls back to `sdpa` with one line saying why if anything fails. Asked for
explicitly (`--attn-implementation flex_attention`) a failure is an error instead. The
processes of a launch agree (`agree`): one that falls back takes the others along.

`attention.plan.planned` is the same decision before any weight is loaded, for the memory
estimate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from qorpo.attention import FLEX, PAIR_ATTENTION
from qorpo.attention.masks import attn_implementation
from qorpo.attention.pairs import replaces, use_pair_attention
from qorpo.attention.plan import planned
from qorpo.data.collate import build_batch
from qorpo.data.placement import PAD_MULTIPLE
from qorpo.errors import ModelError
from qorpo.forward import hidden_states, mixed_precision, probe_layout, probe_pairs
from qorpo.model import unwrap
from qorpo.quant import fsdp_active

# The start-up training step's pairs: two packed rows of 160 tokens. At least 128 query
# positions (shorter rows would compile FlexAttention's decoding kernel, not the training one),
# not a multiple of 128 (a partial last tile, as most rows have), more than one row.
CHECK_SHAPES = ((61, 37, 45), (9, 3, 5), (50, 30, 41), (7, 2, 6))
CHECK_ROW_TOKENS = 160


class KernelChoice(NamedTuple):
    name: str  # the attention implementation the model runs now
    note: str | None  # one line for the user (what was chosen, or why not), or None
    fell_back: bool = False  # the planned kernel could not be used here


def choose(model: nn.Module, device: str, layout: str, requested: str | None) -> KernelChoice:
    """Switch a loaded (peft-wrapped) model to the kernel `planned` names, after checking that
    it trains here. Returns the implementation it runs and a line to print."""
    base = unwrap(model)
    current = attn_implementation(model)
    kernel = planned(device, layout, requested)
    if kernel is None:
        return KernelChoice(current, None)
    if requested == FLEX:  # loaded with it; a failure is the user's explicit choice: an error
        if fsdp_active():
            return KernelChoice(FLEX, "FlexAttention is used unchecked under FSDP (the model "
                                "reaches the GPU only when FSDP wraps it)")
        problem = _flex_problem(model, layout)
        if problem:
            raise ModelError(f"--attn-implementation flex_attention: {problem}. Leave "
                             "--attn-implementation empty (qorpo then falls back to sdpa) or "
                             "pass sdpa.")
        return KernelChoice(FLEX, None)
    name = "FlexAttention" if kernel == FLEX else "Per-pair attention"
    if current != "sdpa" and not (kernel == PAIR_ATTENTION and replaces(base.config)):
        # e.g. an eager-only model: it keeps its kernel and the dense mask
        return KernelChoice(current, f"{name} is tried only in place of sdpa; this model runs "
                            f"{current}, with a dense mask for the {layout} layout",
                            fell_back=True)
    if kernel == PAIR_ATTENTION:
        if use_pair_attention(base):
            return KernelChoice(PAIR_ATTENTION, None)
        _set(base, current)
        return KernelChoice(current, f"{type(base).__name__} cannot switch to per-pair "
                            f"attention; the {layout} layout runs on sdpa with a dense mask",
                            fell_back=True)
    try:
        base.set_attn_implementation(FLEX)
    except Exception as exc:  # no flex support in this class (ValueError, ImportError, ...)
        _set(base, current)  # a composite model may have switched part of itself
        return KernelChoice(current, f"FlexAttention is not available for {type(base).__name__} "
                            f"({_first_line(exc)}); the {layout} layout runs on sdpa with a "
                            "dense mask", fell_back=True)
    if attn_implementation(model) != FLEX:  # transformers may decline with a warning only
        _set(base, current)
        return KernelChoice(current, f"{type(base).__name__} cannot switch to FlexAttention; "
                            f"the {layout} layout runs on sdpa with a dense mask", fell_back=True)
    problem = _flex_problem(model, layout)
    if problem:
        _set(base, current)
        return KernelChoice(current, f"FlexAttention {problem}; the {layout} layout runs on "
                            "sdpa with a dense mask", fell_back=True)
    return KernelChoice(FLEX, f"attention: FlexAttention block mask for the {layout} layout "
                        "(its kernels compiled and checked against the padded layout)")


def agree(choice: KernelChoice, model: nn.Module) -> KernelChoice:
    """Under torchrun / accelerate launch each process checks FlexAttention on its own GPU.
    They should run one kernel, and only the main process prints: if any process could not use
    FlexAttention, none does. Every process of a launch calls this (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return choice
    device = next(model.parameters()).device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    flex = torch.tensor([int(choice.name == FLEX)], device=device)
    dist.all_reduce(flex, op=dist.ReduceOp.MIN)
    if flex.item() or choice.name != FLEX:
        return choice
    _set(unwrap(model), "sdpa")
    return KernelChoice("sdpa", "FlexAttention failed its start-up check in another process of "
                        "this launch; every process runs sdpa with a dense mask", fell_back=True)


def _set(base: nn.Module, implementation: str) -> None:
    """Back to `implementation`, as far as the model lets itself be switched."""
    with contextlib.suppress(Exception):
        base.set_attn_implementation(implementation)


def _flex_problem(model: nn.Module, layout: str) -> str | None:
    """Why FlexAttention cannot train this model here, or None: one forward and backward of a
    small packed batch (compiles both kernels), then the layout probe against padded rows."""
    try:
        train_step_runs(model)
        err, tol = probe_layout(model, layout)  # type: ignore[arg-type]
    except Exception as exc:  # a kernel that does not compile (Triton resources), no backward
        return f"failed its start-up training step: {_first_line(exc)}"
    if not err <= tol:  # also catches NaN
        return f"gave hidden states {err:.2g} away from the padded layout's (tolerance {tol:g})"
    return None


def train_step_runs(model: nn.Module) -> int:
    """One forward and backward of the probe's pairs, packed, in training mode (gradient
    checkpointing and dropout as in the run). The gradients are returned by autograd.grad, not
    accumulated into .grad, and the RNG state is restored: the run is unchanged by it.
    Returns how many trainable tensors got a gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("the model has no trainable parameters")
    device = params[0].device
    batch = build_batch(probe_pairs(model, CHECK_SHAPES), "packed", pad_token_id=0,
                        max_row_tokens=CHECK_ROW_TOKENS,
                        pad_to_multiple_of=PAD_MULTIPLE).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            _training(model), mixed_precision(model):
        h = hidden_states(model, batch)  # (R, L, H)
        grads = torch.autograd.grad(h.float().square().mean(), params, allow_unused=True)
    got = [g for g in grads if g is not None]
    if not all(bool(torch.isfinite(g).all()) for g in got):
        raise ModelError("the backward gave non-finite gradients")
    return len(got)


@contextlib.contextmanager
def _training(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def for_generation(model: nn.Module) -> Iterator[None]:
    """sdpa while generating: FlexAttention's compiled kernels would recompile for the decode
    steps' shapes (the per-pair kernel needs nothing: without pair boundaries it attends over
    whole rows with the model's own mask)."""
    base = unwrap(model)
    current = attn_implementation(model)
    if current != FLEX:
        yield
        return
    try:
        base.set_attn_implementation("sdpa")
    except (ValueError, ImportError):  # no sdpa in this class: generate through flex
        yield
        return
    try:
        yield
    finally:
        base.set_attn_implementation(current)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:240].rstrip(".") if text else type(exc).__name__
