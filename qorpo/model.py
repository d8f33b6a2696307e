"""Model side: dtype choice, 4-bit/8-bit loading, LoRA, gradient checkpointing, and the bridge
from a (peft-wrapped) causal LM to the chunked loss: final hidden states + the model's own head.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from qorpo.config import TrainConfig
from qorpo.errors import ConfigError, ModelError
from qorpo.hf import DTYPES, quiet, text_config
from qorpo.loss import OutputHead
from qorpo.quant import bnb_config, fsdp_active, keep_4bit_differentiable
from qorpo.sysmem import release_file_mappings


class DtypeChoice(NamedTuple):
    dtype: torch.dtype
    name: str  # bf16 | fp16 | fp32
    reason: str


def device_of_process() -> torch.device:
    """This process's device: its local GPU under accelerate/torchrun, else GPU 0, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _native_bf16() -> bool:
    # A T4 reports bf16 "supported" (emulated, slow, and fp16 is what its tensor cores do):
    # only count native support (compute capability >= 8.0).
    return torch.cuda.is_bf16_supported(including_emulation=False)


def choose_dtype(requested: str, device: torch.device) -> DtypeChoice:
    """auto: bf16 where the GPU has it, fp16 on older GPUs (T4/V100), fp32 on CPU."""
    if requested != "auto":
        if device.type == "cpu" and requested == "fp16":  # accelerate: no fp16 autocast on CPU
            raise ConfigError(["--dtype fp16 trains only on a CUDA GPU (fp16 mixed precision, "
                               "autocast and loss scaling, is GPU-only in transformers' "
                               "Trainer); on the CPU use fp32 (the default) or bf16"])
        if device.type == "cpu" and requested != "fp32":
            return DtypeChoice(DTYPES[requested], requested,
                               f"asked for {requested}; note: emulated and slow on CPU")
        if requested == "bf16" and device.type == "cuda" and not _native_bf16():
            raise ModelError("bf16 was requested but this GPU has no bf16 support; "
                             "use --dtype fp16 (or auto)")
        return DtypeChoice(DTYPES[requested], requested, "asked for")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if _native_bf16():
            return DtypeChoice(torch.bfloat16, "bf16", f"{name} supports bf16")
        return DtypeChoice(torch.float16, "fp16",
                           f"{name} has no bf16: fp16 compute, fp32 LoRA weights, loss scaling")
    return DtypeChoice(torch.float32, "fp32", "CPU: bf16 is emulated there, fp32 is faster")


def attn_problems(requested: str | None, device: torch.device) -> list[str]:
    """What keeps --attn-implementation from training on this device, before anything loads
    (qorpo.preflight lists it with the other problems): an unknown name, FlexAttention on the
    CPU (torch has no FlexAttention backward there; its forward alone would run),
    FlashAttention off CUDA or without its package."""
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if requested is None:
        return []
    empty = "leave it empty for qorpo's choice"
    names = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if requested not in names and not is_kernel(requested):  # (a hub kernel: org/name)
        return [f"--attn-implementation {requested!r} is not an attention implementation: use "
                f"one of {', '.join(names)}, a hub kernel (org/name), or {empty}"]
    if requested == "flex_attention" and device.type != "cuda":
        return [f"--attn-implementation flex_attention trains only on a CUDA GPU (torch has "
                f"no FlexAttention backward on {device.type}); leave it empty on the CPU: "
                "qorpo's pair attention is used there"]
    if requested.startswith("flash_attention_"):
        if device.type != "cuda":
            return [f"--attn-implementation {requested} runs only on a CUDA GPU (FlashAttention "
                    f"has no {device.type} kernels); {empty} (on the CPU: qorpo's pair "
                    "attention)"]
        if not _flash_available(requested):
            return [f"--attn-implementation {requested} needs the flash-attn package, which is "
                    "not installed: pip install flash-attn --no-build-isolation (or pip install "
                    f"kernels for the hub's build), or {empty} (FlexAttention or sdpa)"]
    return []


def _flash_available(name: str) -> bool:
    """FlashAttention `name` can load: its package, or the `kernels` package (transformers
    then fetches a build from the hub instead)."""
    from transformers.modeling_flash_attention_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX
    from transformers.utils import is_kernels_available

    version = name.removeprefix("flash_attention_")
    entry = FLASH_ATTENTION_COMPATIBILITY_MATRIX.get(int(version)) if version.isdigit() else None
    if entry is None:  # a version this transformers does not know: let it decide at load
        return True
    return bool(entry["general_availability_check"]()) or bool(is_kernels_available())


def check_attn_implementation(requested: str | None, device: torch.device) -> None:
    """Raise ConfigError if --attn-implementation cannot train on this device (attn_problems)."""
    problems = attn_problems(requested, device)
    if problems:
        raise ConfigError(problems)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_source(cfg: TrainConfig) -> None:
    """Find a missing or wrong --model before anything is loaded (ModelError says which)."""
    ref = str(cfg.model)
    path = Path(ref).expanduser()
    if not path.exists():
        if path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1 or "\\" in ref:
            raise ModelError(f"--model {ref}: no such folder (looked from {Path.cwd()}). Pass a "
                             "model folder or a Hugging Face hub id such as "
                             "HuggingFaceTB/SmolLM2-360M-Instruct.")
        return  # a hub id: checked when it is loaded
    if not path.is_dir():
        raise ModelError(f"--model {ref} is a file; pass the folder that holds the model.")
    have = {p.name for p in path.iterdir()}
    expect = ("a model folder holds config.json, the weights (*.safetensors) and the tokenizer "
              "(tokenizer.json or tokenizer.model), as save_pretrained writes them")
    if "config.json" not in have:
        raise ModelError(f"--model {ref} is not a model folder: config.json is missing ({expect}).")
    if not have & set(_TOKENIZER_FILES):
        raise ModelError(f"--model {ref} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                         f"{expect}.")
    if not any(n.endswith(".safetensors") for n in have) and not (
            cfg.allow_pickle and any(n.endswith(".bin") for n in have)):
        raise ModelError(f"--model {ref} has no *.safetensors weights"
                         + ("" if cfg.allow_pickle else " (pickle .bin weights load only with "
                                                        "--allow-pickle)") + f"; {expect}.")


def _custom_code_error(ref: str) -> ModelError:
    """The model (or its tokenizer) ships its own Python code: run only when asked."""
    path = Path(ref).expanduser()
    if path.is_dir():
        files = sorted(p.name for p in path.glob("*.py"))
        where = f"read {', '.join(files) or 'its .py files'} in {path.resolve()}"
    else:
        where = f"read its .py files at https://huggingface.co/{ref}"
    return ModelError(f"--model {ref} ships its own code (auto_map in its config), which qorpo "
                      f"runs only with --trust-remote-code: {where}, then pass "
                      "--trust-remote-code if you trust it")


def _load_error(ref: str, exc: Exception) -> ModelError:
    """A short, actionable message for a model or tokenizer that would not load."""
    if "trust_remote_code" in str(exc):  # transformers refused the model's own code
        return _custom_code_error(ref)
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if Path(ref).expanduser().exists():
        return ModelError(f"could not load --model {ref}: {reason}")
    return ModelError(f"could not load --model {ref} from the Hugging Face hub: {reason}. Check "
                      "the model id and your network (offline, HF_HUB_OFFLINE=1 uses models "
                      "already in the cache), or pass a local model folder.")


def check_model_config(cfg: TrainConfig) -> None:
    """Read the model's config (no weight; none of the model's own code unless
    --trust-remote-code, and never a prompt asking): a model with its own code is refused here
    without the flag, and --lora-targets are matched against its modules, built on the meta
    device (best effort: add_lora checks the loaded model again)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = cfg.trust_remote_code is True  # (None would make transformers ask on stdin)
    try:
        with quiet():
            config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision,
                                                trust_remote_code=trust)
    except (OSError, ValueError) as exc:  # hub errors are OSErrors; bad files ValueErrors
        raise _load_error(str(cfg.model), exc) from exc
    if cfg.lora_targets == ["all-linear"]:
        return
    try:
        with torch.device("meta"), quiet():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    except Exception:  # noqa: BLE001 - e.g. a config only from_pretrained completes
        return
    check_lora_targets(skeleton, cfg)


def load_tokenizer(cfg: TrainConfig) -> Any:
    """The model's tokenizer, after the model folder and config are checked (check_model_source,
    check_model_config): what a user can get wrong about the model is found before any weight
    loads."""
    from transformers import AutoTokenizer

    check_model_source(cfg)
    check_model_config(cfg)
    try:
        return AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision,
                                             trust_remote_code=cfg.trust_remote_code is True)
    except (OSError, ValueError) as exc:  # hub errors are OSErrors; bad files ValueErrors
        raise _load_error(str(cfg.model), exc) from exc


def load_base_model(cfg: TrainConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        revision=cfg.revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code is True,
        use_safetensors=None if cfg.allow_pickle else True,
        quantization_config=bnb_config(cfg.quant, dtype),
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if fsdp_active():  # FSDP places and shards the weights; rank 0 reads them (accelerate's
        kwargs["low_cpu_mem_usage"] = True  # fsdp_cpu_ram_efficient_loading), others wait
    elif device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    except OSError as exc:
        if not cfg.allow_pickle and "safetensors" in str(exc).lower():
            raise ModelError(f"{cfg.model}: no safetensors weights found. qorpo does not load "
                             "pickle (.bin) weights unless you pass --allow-pickle.") from exc
        raise _load_error(str(cfg.model), exc) from exc
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    keep_4bit_differentiable(model)
    if device.type == "cpu":
        release_file_mappings(model)  # see qorpo.sysmem: -0.5 GB RSS on the demo model
    return model


def lora_dropout_for(model: nn.Module, cfg: TrainConfig) -> tuple[float, str | None]:
    """The LoRA dropout this model can take, and a note when it is not --lora-dropout. With
    all-linear, peft (>= 0.18) adapts a mixture-of-experts model's fused 3-D expert tensors as
    parameters (its ParamWrapper, `target_parameters`), which refuse any dropout: such a run
    trains with none rather than stopping on the default 0.05."""
    experts = [n for n, p in model.named_parameters() if p.dim() == 3]
    if not experts or cfg.lora_dropout == 0 or cfg.lora_targets != ["all-linear"]:
        return cfg.lora_dropout, None
    return 0.0, (f"LoRA dropout 0 instead of {cfg.lora_dropout:g}: this model's experts are "
                 f"3-D parameters ({experts[0]}, …), which peft adapts without dropout")


def add_lora(model: nn.Module, cfg: TrainConfig, dtype: torch.dtype) -> nn.Module:
    """Wrap in peft LoRA; non-reentrant gradient checkpointing; input grads enabled."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    ckpt_kwargs = {"use_reentrant": False}
    if cfg.quant != "none":
        with quiet():
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs=ckpt_kwargs)
        # prepare_model_for_kbit_training upcasts every non-quantised weight to fp32. For the
        # frozen embedding and output head that doubles their memory (2 GB for a 128k vocab at
        # 8B) and buys nothing: put them back in the compute dtype. Norms stay fp32.
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.to(dtype)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    check_lora_targets(model, cfg)
    targets: Any = cfg.lora_targets
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft: every linear layer except the output head
    dropout, _ = lora_dropout_for(model, cfg)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=dropout,
                      target_modules=targets, use_rslora=cfg.use_rslora, bias="none",
                      task_type="CAUSAL_LM")
    try:
        with quiet():
            # FSDP flattens each unit's parameters into one tensor of one dtype: LoRA weights
            # then stay in the compute dtype (peft would upcast them to fp32).
            model = get_peft_model(model, lora, autocast_adapter_dtype=not fsdp_active())
    except ValueError as exc:
        raise ModelError(f"LoRA targets {cfg.lora_targets}: {exc}") from exc
    if fsdp_active():  # the norms prepare_model_for_kbit_training upcast, back to one dtype
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model


def linear_layer_names(model: nn.Module) -> list[str]:
    """The short names (q_proj, down_proj...) of the model's linear layers but the output head,
    as --lora-targets takes them, de-duplicated in model order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = (name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if module is not head and (isinstance(module, nn.Linear)
                                        or type(module).__name__ == "Conv1D"))
    return list(dict.fromkeys(names))


def check_lora_targets(model: nn.Module, cfg: TrainConfig) -> None:
    """Refuse --lora-targets names that match no module (peft matches a name against the end
    of each module's dotted path; it reports only a list that matches nothing at all)."""
    if cfg.lora_targets == ["all-linear"]:
        return
    paths = [name for name, _ in model.named_modules() if name]
    missing = [t for t in cfg.lora_targets
               if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        raise ModelError(f"--lora-targets {', '.join(missing)}: {cfg.model} has no module of "
                         f"that name; its linear layers are {', '.join(linear_layer_names(model))} "
                         "(or use all-linear)")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under DDP/peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def output_head(model: nn.Module) -> OutputHead:
    """The model's own vocabulary projection and post-head transforms, for the chunked loss."""
    base = unwrap(model)
    head = base.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ModelError(f"{type(base).__name__} has no output embedding (lm_head) qorpo can use")
    if getattr(head, "base_layer", None) is not None:  # a LoRA-wrapped head (user's choice)
        raise ModelError("LoRA on the output head is not supported by the chunked loss; "
                         "remove lm_head from --lora-targets")
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2 or weight.dtype in (torch.uint8, torch.int8):
        raise ModelError(f"{type(base).__name__}: the output head is quantised or not a plain "
                         "matrix; qorpo needs it in a float dtype")
    cfg = base.config
    text_cfg = text_config(cfg)
    scale = 1.0
    if getattr(text_cfg, "logit_scale", None):  # Cohere: logits * logit_scale
        scale *= float(text_cfg.logit_scale)
    if getattr(text_cfg, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale /= float(text_cfg.logits_scaling)
    softcap = getattr(text_cfg, "final_logit_softcapping", None)  # Gemma-2/3
    return OutputHead(weight, getattr(head, "bias", None), scale,
                      float(softcap) if softcap else None)


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor,
                        position_ids: torch.Tensor | None = None,
                        **kwargs: Any) -> torch.Tensor:
    """(rows, T, H) final (post-norm) hidden states, through every wrapper's own forward.

    Going through `model(...)` keeps DDP/FSDP/peft hooks intact. `logits_to_keep=1` makes the
    model project only one position per row (rows × V logits, negligible); the full hidden
    states come from `output_hidden_states`, whose last entry is the normed output. They cost
    no extra memory under gradient checkpointing: they are the tensors it keeps anyway.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, logits_to_keep=1, use_cache=False, **kwargs)
    return out.hidden_states[-1]


def supports_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters
