"""qorpo.attention.choice: which attention kernel a shared/packed run uses, and the start-up
check that decides between FlexAttention and sdpa on CUDA.

The check runs one forward and backward through FlexAttention. torch has no FlexAttention
backward on the CPU, so here that check fails for real — which is exactly the fallback a GPU
whose shared memory cannot hold the backward kernel takes. The success path is tested with
the backward step replaced by the forward alone (marked where it is done).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qorpo.attention import FLEX, PAIR_ATTENTION
from qorpo.attention.choice import choose, for_generation, train_step_runs
from qorpo.attention.masks import attn_implementation
from qorpo.attention.plan import flex_available, planned
from qorpo.data.collate import build_batch
from qorpo.errors import ModelError
from qorpo.forward import evaluating, hidden_states
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
    assert "FlexAttention failed its start-up training step" in choice.note
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
    with pytest.raises(ModelError, match="--attn-implementation flex_attention: failed its "
                       "start-up training step: .*backward") as err:
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

    monkeypatch.setattr("qorpo.attention.choice.train_step_runs", forward_step)
    model = lora_model("qwen2", "sdpa")
    before = eager_flex["block_mask"]
    choice = choose(model, "cuda", "packed", None)
    assert choice.name == FLEX and not choice.fell_back and "FlexAttention" in choice.note
    assert attn_implementation(model) == FLEX and forward_only
    assert eager_flex["block_mask"] > before  # the probe went through the BlockMask
    with for_generation(model):
        assert attn_implementation(model) == "sdpa"
    assert attn_implementation(model) == FLEX


def test_a_model_that_declines_the_switch_is_not_reported_as_flex(eager_flex, monkeypatch):  # noqa: F811
    """transformers only logs a warning when a model cannot change its attention (remote
    code): qorpo must notice, not report FlexAttention while the model still runs sdpa."""
    model = lora_model("llama", "sdpa")
    base = model.get_base_model()
    monkeypatch.setattr(type(base), "_can_set_attn_implementation", classmethod(lambda c: False))
    choice = choose(model, "cuda", "packed", None)
    assert choice.fell_back and choice.name == "sdpa" == attn_implementation(model)
    assert "cannot switch to FlexAttention" in choice.note


def test_a_model_without_sdpa_keeps_its_kernel_and_says_so():
    model = lora_model("llama", "eager")
    choice = choose(model, "cuda", "shared", None)
    assert choice.fell_back and choice.name == "eager" == attn_implementation(model)
    assert "runs eager" in choice.note


def test_a_cpu_model_without_sdpa_is_not_reported_as_per_pair_attention():
    """The per-pair kernels stand in for sdpa only: an eager model keeps eager and its dense
    mask, and says so (fell_back: the run's estimate is redone without the per-pair kernels)."""
    model = lora_model("llama", "eager")
    choice = choose(model, "cpu", "packed", None)
    assert choice.fell_back and choice.name == "eager" == attn_implementation(model)
    assert "Per-pair attention is tried only in place of sdpa" in choice.note
    assert "runs eager" in choice.note


def test_the_training_step_check_leaves_the_run_unchanged(tmp_path):
    """train_step_runs (sdpa here: it has a CPU backward) computes every LoRA gradient without
    accumulating it, and restores the RNG (LoRA dropout draws from it) and the model's mode."""
    from qorpo.config import TrainConfig
    from qorpo.model import add_lora, load_base_model
    from tests.tiny import make_model

    path = make_model(tmp_path / "m", arch="llama")
    cfg = TrainConfig(model=str(path), quant="4bit", lora_dropout=0.1)
    model = add_lora(load_base_model(cfg, torch.float32, torch.device("cpu")), cfg,
                     torch.float32)
    model.eval()
    torch.manual_seed(3)
    rng = torch.random.get_rng_state()
    n_lora = sum(1 for n, p in model.named_parameters() if "lora_" in n)
    assert train_step_runs(model) == n_lora  # every LoRA tensor got its gradient
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    # guard: a training-mode forward does draw from the RNG (dropout masks), so the check
    # above would fail without train_step_runs' fork of the RNG
    model.train()
    with torch.no_grad():
        hidden_states(model, build_batch(random_pairs(seed=2), "packed", pad_token_id=2))
    assert not torch.equal(torch.random.get_rng_state(), rng)


def test_generation_gets_the_kernel_back_after_an_error(eager_flex):  # noqa: F811
    model = lora_model("llama", "flex_attention")
    with pytest.raises(RuntimeError, match="boom"), for_generation(model):
        assert attn_implementation(model) == "sdpa"
        raise RuntimeError("boom")
    assert attn_implementation(model) == FLEX


def _agree_worker(rank: int, init: str, results: str, path: str) -> None:
    import json

    import torch.distributed as dist

    from qorpo.attention.choice import KernelChoice, agree
    from qorpo.config import TrainConfig
    from qorpo.model import add_lora, load_base_model

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        cfg = TrainConfig(model=path, quant="none")
        model = add_lora(load_base_model(cfg, torch.float32, torch.device("cpu")), cfg,
                         torch.float32)
        if rank == 0:  # this process's check passed: the model runs FlexAttention
            model.get_base_model().set_attn_implementation(FLEX)
            mine = KernelChoice(FLEX, "attention: FlexAttention block mask")
        else:  # this one's failed: it is back on sdpa
            mine = KernelChoice("sdpa", "FlexAttention failed its start-up training step: x",
                                fell_back=True)
        got = agree(mine, model)
        Path(results, f"{rank}.json").write_text(json.dumps(
            {"name": got.name, "fell_back": got.fell_back, "note": got.note,
             "runs": attn_implementation(model)}))
    finally:
        dist.destroy_process_group()


def test_processes_of_a_launch_agree_on_the_kernel(tmp_path):
    """One process whose FlexAttention check failed takes every process back to sdpa (and the
    main process, the one that prints, says so)."""
    import json

    import torch.multiprocessing as mp

    from tests.tiny import make_model

    path = make_model(tmp_path / "m", arch="llama")
    mp.spawn(_agree_worker, args=(f"file://{tmp_path / 'init'}", str(tmp_path), str(path)),
             nprocs=2)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert [g["runs"] for g in got] == ["sdpa", "sdpa"]
    assert [g["name"] for g in got] == ["sdpa", "sdpa"]
    assert all(g["fell_back"] for g in got)
    assert "another process" in got[0]["note"]
