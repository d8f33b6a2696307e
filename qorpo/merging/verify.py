"""Check a merged model against base + adapter, the way peft runs them.

A few fixed chat prompts go through (a) the reference, base + adapter as ``PeftModel`` builds it
(for ``into="dequantized"``: the 4-bit NF4 base, exactly as trained), and (b) the merged folder
loaded fresh with plain ``AutoModelForCausalLM``. Models are loaded one after the other so the
peak stays at one model.

Tolerance, on the max-abs logit difference:
``max(RTOL[dtype] * max(1, max|reference logit|), 3 * compute noise)``.

* The relative floor: fp32 ``1e-4``: merged and unmerged forwards differ only in fp32
  summation order ((W + sBA)x vs Wx + s·B(Ax)), ~1e-7 relative per matmul, growing over the
  layers; 1e-4 leaves ~100-1000x headroom yet is far below what a missing, doubled or
  transposed delta does. fp16 ``1e-3`` and bf16 ``8e-3`` are ~2 ulps at the largest logit.
* 16-bit outputs also *compute* in 16 bits, and that noise grows with depth and activation
  size, so a fixed number is either too tight for deep models or too loose for small ones.
  It is measured instead: the merged model is run a second time upcast to fp32, and the
  difference is its compute noise. On tiny random Llamas (2-16 layers) a correct merge's total
  gap was 1.0-1.3x that noise (rounding W + ΔW to 16 bits alone: 0.5-0.9x), hence the 3x.
  A missing or wrong delta moves logits by about the adapter's own effect (reported, measured
  by disabling the adapter), which was 30-1000x that noise. If an adapter's effect is below the
  tolerance, the summary says the check is weak (verify an fp32 merge instead).

The report also gives the adapter's own effect (base alone vs reference) for scale, and when
cheap the *other* gap (the merged model vs the other reference), so users can pick ``--into``.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from qorpo.data.encode import prompt_ids
from qorpo.hf import quiet
from qorpo.quant import bnb_config, keep_4bit_differentiable

PROMPTS = (
    "What is the capital of France?",
    "Write one short sentence about the sea.",
    "Explain in one sentence what a preference pair is.",
)
RTOL = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 8e-3}
NOISE_MULT = 3.0
_CHEAP_PARAMS = 300_000_000  # "other gap" costs one more model load: do it for small models


@dataclass(frozen=True)
class LogitGap:
    """How far one model's logits are from a reference's, over all prompt positions."""

    max_abs: float
    mean_abs: float
    agreement: float  # fraction of positions with the same greedy (argmax) token
    ref_absmax: float

    def __str__(self) -> str:
        return (
            f"max|Δ|={self.max_abs:.3g} mean|Δ|={self.mean_abs:.3g} "
            f"greedy agreement={self.agreement:.1%}"
        )


class VerifyReport(NamedTuple):
    reference: str  # what the merged model was compared with
    dtype: str
    gap: LogitGap
    tolerance: float  # absolute, on gap.max_abs
    passed: bool
    compute_noise: float  # merged model in its dtype vs upcast to fp32 (0 for fp32)
    adapter_effect: LogitGap | None  # base without adapter vs reference: the scale of the change
    other_reference: str | None
    other_gap: LogitGap | None
    prompts: int

    def summary(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        text = f"{verdict}: vs {self.reference}: {self.gap} (tolerance {self.tolerance:.3g})"
        if self.compute_noise:
            text += f"; {self.dtype} compute noise {self.compute_noise:.3g}"
        if self.adapter_effect is not None:
            text += f"; adapter effect max|Δ|={self.adapter_effect.max_abs:.3g}"
            if self.adapter_effect.max_abs <= self.tolerance:
                text += " (below tolerance: weak check, verify an fp32 merge)"
        if self.other_gap is not None:
            text += f"; vs {self.other_reference}: {self.other_gap}"
        return text


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> LogitGap:
    diffs = [(r.float() - o.float()).abs() for r, o in zip(reference, other, strict=True)]
    same = [(r.argmax(-1) == o.argmax(-1)).float() for r, o in zip(reference, other, strict=True)]
    return LogitGap(
        max_abs=max(d.max().item() for d in diffs),
        mean_abs=torch.cat([d.flatten() for d in diffs]).mean().item(),
        agreement=torch.cat(same).mean().item(),
        ref_absmax=max(r.abs().max().item() for r in reference),
    )


def prompt_batch(tokenizer: Any, prompts: tuple[str, ...] = PROMPTS) -> list[torch.Tensor]:
    """(1, T) ids of each prompt, encoded exactly as training encodes prompts."""
    return [torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": p}])])
            for p in prompts]


@torch.no_grad()
def logits_of(model: Any, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=x).logits[0].float() for x in ids]


def _free(*objs: Any) -> None:
    del objs
    gc.collect()


def load_reference(
    base_dir: Path,
    adapter_dir: Path,
    *,
    four_bit: bool,
    use_safetensors: bool = True,
    trust_remote_code: bool = False,
) -> Any:
    """base + adapter as peft builds it; ``four_bit``: the NF4 double-quant base of training.
    (peft builds on the model given: it loads no model code of its own.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qorpo.merging.experts import pattern_noise_hidden

    kwargs: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": use_safetensors,
                              "trust_remote_code": trust_remote_code}
    if four_bit:
        kwargs["quantization_config"] = bnb_config("4bit", torch.float32)
        kwargs["device_map"] = "cpu"
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    # compute like training did: dequantise + fp32 matmul, not bnb's bf16 CPU inference kernel
    keep_4bit_differentiable(base)
    with pattern_noise_hidden():
        return PeftModel.from_pretrained(base, str(adapter_dir))


def _reference_logits(
    base_dir: Path,
    adapter_dir: Path,
    ids: list[torch.Tensor],
    *,
    four_bit: bool,
    use_safetensors: bool,
    with_base: bool,
    trust_remote_code: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    model = load_reference(
        base_dir,
        adapter_dir,
        four_bit=four_bit,
        use_safetensors=use_safetensors,
        trust_remote_code=trust_remote_code,
    )
    ref = logits_of(model, ids)
    base_only = None
    if with_base:
        with model.disable_adapter():
            base_only = logits_of(model, ids)
    _free(model)
    return ref, base_only


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def verification_budget(n_params: int, copies: float = 1.0) -> tuple[bool, str]:
    """Whether verifying fits comfortably: ``copies`` fp32 copies of the model alive at once
    (4 B/param each, +30% for activations and loading buffers) must take at most half of the
    available RAM. The merge's check holds one (models are loaded one at a time)."""
    need = int(n_params * 4 * 1.3 * copies)
    avail = _available_ram()
    if need <= avail // 2:
        return True, ""
    what = "an fp32 reference" if copies == 1 else f"{copies:g} fp32 copies of the model"
    return False, f"needs ~{need / 1e9:.1f} GB RAM for {what}, {avail / 1e9:.1f} GB available"


def verify_merged(
    merged_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    *,
    into: str = "original",
    dtype: str = "fp32",
    other: bool | None = None,
    use_safetensors: bool = True,
    trust_remote_code: bool = False,
) -> VerifyReport:
    """Compare ``merged_dir`` with base + adapter; ``other=None`` adds the other gap when cheap."""
    with quiet():
        return _verify(
            Path(merged_dir),
            Path(adapter_dir),
            Path(base_dir),
            into,
            dtype,
            other,
            use_safetensors,
            trust_remote_code,
        )


def _verify(
    merged_dir: Path,
    adapter_dir: Path,
    base_dir: Path,
    into: str,
    dtype: str,
    other: bool | None,
    use_safetensors: bool,
    trust: bool,
) -> VerifyReport:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = prompt_batch(AutoTokenizer.from_pretrained(str(merged_dir), trust_remote_code=trust))
    # its own dtype, no peft
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), trust_remote_code=trust)
    n_params = sum(p.numel() for p in merged.parameters())
    got = logits_of(merged, ids)
    noise = 0.0
    if dtype != "fp32":
        noise = compare(logits_of(merged.float(), ids), got).max_abs
    _free(merged)
    four_bit = into == "dequantized"
    ref, base_only = _reference_logits(
        base_dir,
        adapter_dir,
        ids,
        four_bit=four_bit,
        use_safetensors=use_safetensors,
        with_base=True,
        trust_remote_code=trust,
    )
    gap = compare(ref, got)
    tolerance = max(RTOL[dtype] * max(1.0, gap.ref_absmax), NOISE_MULT * noise)
    other_gap = None
    passed = gap.max_abs <= tolerance
    if passed and (other or (other is None and n_params <= _CHEAP_PARAMS)):
        other_ref, _ = _reference_logits(
            base_dir,
            adapter_dir,
            ids,
            four_bit=not four_bit,
            use_safetensors=use_safetensors,
            with_base=False,
            trust_remote_code=trust,
        )
        other_gap = compare(other_ref, got)
    names = {True: "4-bit NF4 base + adapter (as trained)", False: "fp32 base + adapter (peft)"}
    return VerifyReport(
        reference=names[four_bit],
        dtype=dtype,
        gap=gap,
        tolerance=tolerance,
        passed=passed,
        compute_noise=noise,
        adapter_effect=compare(ref, base_only) if base_only is not None else None,
        other_reference=names[not four_bit] if other_gap is not None else None,
        other_gap=other_gap,
        prompts=len(ids),
    )
