"""qorpo.kernels: which attention kernel a shared/packed run uses, and the start-up check that
decides between FlexAttention and sdpa on CUDA.

The check runs one forward and backward through FlexAttention. torch has no FlexAttention
backward on the CPU, so here that check fails for real — which is exactly the fallback a GPU
whose shared memory cannot hold the backward kernel takes. The success path is tested with
the backward step replaced by the forward alone (marked where it is done).
"""

from __future__ import annotations

import pytest
import torch

from qorpo.attention import NAME as PAIR_ATTENTION
from qorpo.data.collate import build_batch
from qorpo.errors import ModelError
from qorpo.forward import attn_implementation, evaluating, hidden_states
from qorpo.kernels import FLEX, choose, flex_available, for_generation, planned, train_step_runs
from tests.test_flex import eager_flex  # noqa: F401  (fixture)
from tests.test_layout import lora_model, random_pairs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def test_planned_kernel_per_device_layout_and_request():
    for layout in ("shared", "packed"):
        assert planned("cpu", layout, None) == PAIR_ATTENTION
        assert planned("cpu", layout, "sdpa") == PAIR_ATTENTION  # the pair kernels are sdpa
        assert planned("cpu", layout, "eager") is None
        assert planned("cuda", layout, None) == (FLEX if flex_available() else None)
        assert planned("cuda", layout, "flex_attention") == FLEX
        assert planned("cuda", layout, "sdpa") is None  # asked for: kept
        assert planned("cuda", layout, "eager") is None
    for device in ("cpu", "cuda"):
        assert planned(device, "padded", None) is None  # the model builds its own masks


def test_fsdp_runs_keep_sdpa_unless_flex_is_asked_for(monkeypatch):
    """Under FSDP the model is on the GPU only once the Trainer wraps it: nothing to check
    the kernels on at start-up, so qorpo does not pick FlexAttention itself."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert planned("cuda", "packed", None) is None
    assert planned("cuda", "packed", "flex_attention") == FLEX
    assert planned("cpu", "packed", None) == PAIR_ATTENTION


def test_cpu_run_gets_the_pair_kernels():
    model = lora_model("llama", "sdpa")
    choice = choose(model, "cpu", "packed", None)
    assert choice == (PAIR_ATTENTION, None, False)
    assert attn_implementation(model) == PAIR_ATTENTION


def test_flex_that_cannot_train_here_falls_back_to_sdpa(eager_flex):  # noqa: F811
    """The CUDA choice on a device where FlexAttention's backward fails (the CPU, for real):
    back to sdpa, one line saying why, and the model still gives the padded hidden states."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = lora_model("llama", "sdpa")
    choice = choose(model, "cuda", "packed", None)
    assert choice.fell_back and choice.name == "sdpa"
    assert attn_implementation(model) == "sdpa"
    print(choice.note)
    assert "FlexAttention failed to run a training step" in choice.note
    assert "backward" in choice.note and "sdpa with a dense mask" in choice.note
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated
    pairs = random_pairs(seed=3)
    ref, got = (build_batch(pairs, lay, pad_token_id=2) for lay in ("padded", "packed"))
    with evaluating(model):
        torch.testing.assert_close(hidden_states(model, got).flatten(0, 1)[got.score_index],
                                   hidden_states(model, ref).flatten(0, 1)[ref.score_index],
                                   atol=1e-5, rtol=1e-5)


def test_flex_asked_for_but_unable_to_train_is_an_error(eager_flex):  # noqa: F811
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = lora_model("llama", "flex_attention")
    with pytest.raises(ModelError, match="--attn-implementation flex_attention: failed to run "
                       "a training step on this device: .*backward") as err:
        choose(model, "cuda", "shared", "flex_attention")
    assert "pass sdpa" in str(err.value)


def test_flex_that_trains_is_chosen_and_generation_uses_sdpa(eager_flex, monkeypatch):  # noqa: F811
    pytest.importorskip("torch.nn.attention.flex_attention")
    # The CPU has no FlexAttention backward: here (only) the training step runs its forward.
    forward_only = []

    def forward_step(model):
        with torch.no_grad():
            hidden_states(model, build_batch(random_pairs(seed=5), "packed", pad_token_id=2))
        forward_only.append(True)

    monkeypatch.setattr("qorpo.kernels.train_step_runs", forward_step)
    model = lora_model("qwen2", "sdpa")
    before = eager_flex["block_mask"]
    choice = choose(model, "cuda", "packed", None)
    assert choice.name == FLEX and not choice.fell_back and "FlexAttention" in choice.note
    assert attn_implementation(model) == FLEX and forward_only
    assert eager_flex["block_mask"] > before  # the probe went through the BlockMask
    with for_generation(model):
        assert attn_implementation(model) == "sdpa"
    assert attn_implementation(model) == FLEX


def test_the_training_step_check_leaves_the_run_unchanged():
    """train_step_runs (sdpa here: it has a CPU backward) computes gradients without
    accumulating them, restores the RNG (dropout draws) and the model's mode."""
    model = lora_model("llama", "sdpa", ckpt=True)
    model.eval()
    rng = torch.random.get_rng_state()
    n_lora = sum(1 for n, p in model.named_parameters() if "lora_" in n)
    assert train_step_runs(model) == n_lora  # every LoRA tensor got its gradient
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
