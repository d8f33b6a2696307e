"""What the verification means for the user: is the check weak (the adapter changes nothing the
tolerance would notice), and how far is the merged model from the model they trained?

qorpo trains against a 4-bit NF4 base by default. ``--into original`` adds the trained delta to
the full-precision weights, so the NF4 rounding the adapter learned around is gone; on small
models that moves the logits a lot (SmolLM2-135M demo: see docs/merge.md). ``--into
dequantized`` reproduces the 4-bit training model to fp32 rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from qorpo.merging.verify import LogitGap, VerifyReport

CONFIG_FILE = "qorpo_config.yaml"  # qorpo.runs.CONFIG_FILE (runs pulls in training code)

# Measured on the demo (docs/merge.md: SmolLM2-135M, `qorpo train` defaults, 4-bit training),
# vs the trained 4-bit model: --into dequantized max|Δlogit| 1.1e-4, greedy agreement 100%;
# --into original max|Δlogit| 29.2, agreement 59.1%, while the adapter's own effect (base alone
# vs trained) is 17.4-21.4, i.e. the original-weights merge is farther from the trained model
# than the untrained base is. Warn when the greedy (argmax) token differs at more than 1
# position in 10 (below 90%, greedy generations part within a few tokens) ...
AGREEMENT_FLOOR = 0.90
# ... or when the gap is at least half the adapter's own effect: the precision change then
# undoes a large part of what training changed. Both lie far from either measured target
# (100% / 5e-6x effect, and 59% / 1.4-1.7x effect).
EFFECT_FRACTION = 0.5


class Summary(NamedTuple):
    notes: list[str]
    warnings: list[str]


def trained_quant(adapter: Path) -> str | None:
    """The run's ``quant`` (4bit | 8bit | none) from its qorpo_config.yaml, if there is one."""
    import yaml

    folders = [adapter, adapter.parent] if adapter.name.startswith("checkpoint-") else [adapter]
    for folder in folders:
        try:
            cfg = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(cfg, dict) and isinstance(cfg.get("quant"), str):
            return cfg["quant"]
    return None


def summarize(report: VerifyReport, into: str, quant: str | None) -> Summary:
    """Notes and warnings for the merge summary."""
    notes: list[str] = []
    warnings: list[str] = []
    effect = report.adapter_effect
    if effect is not None and effect.max_abs <= report.tolerance:
        warnings.append(_weak(effect.max_abs, report.tolerance))
    sentence, far = _vs_trained(report, into, quant)
    if sentence:
        (warnings if far else notes).append(sentence)
    return Summary(notes, warnings)


def _weak(effect: float, tolerance: float) -> str:
    if effect == 0.0:
        return (
            "weak check: the adapter changes no logit at all (adapter effect 0: its LoRA B "
            "matrices are still zero), so the run trained nothing and the merged model is the "
            "base model; e.g. --max-steps 1 runs its only step at warm-up learning rate 0"
        )
    return (
        f"weak check: the adapter changes the logits by at most {effect:.3g}, within the "
        f"tolerance {tolerance:.3g}, so the check would pass without it; verify an fp32 merge "
        "(--dtype fp32)"
    )


def _vs_trained(report: VerifyReport, into: str, quant: str | None) -> tuple[str, bool]:
    """One sentence: the merged model vs the model training ran; and whether it is far."""
    if quant in ("8bit", "none"):
        if quant == "none" and into == "original":
            return "", False  # the reference is the trained model: the table's logit gap
        what = "an 8-bit base" if quant == "8bit" else "a full-precision base"
        return (f"this run trained on {what}; --into original (the default) is the target that "
                "matches it, --into dequantized adds 4-bit NF4 rounding it never saw"), \
            into == "dequantized"
    trained = "the 4-bit model you trained" if quant == "4bit" else (
        "the 4-bit NF4 base + adapter (what 4-bit training saw)")
    gap: LogitGap | None = report.gap if into == "dequantized" else report.other_gap
    if into == "dequantized":
        other = "--into original gives the full-precision base + the trained delta instead"
    else:
        other = "--into dequantized keeps exactly what 4-bit training saw"
    if gap is None:
        return (f"how far this merge is from {trained} was not measured (models over 300M "
                f"parameters); {other}"), False
    far = gap.agreement < AGREEMENT_FLOOR or (
        report.adapter_effect is not None
        and report.adapter_effect.max_abs > 0
        and gap.max_abs >= EFFECT_FRACTION * report.adapter_effect.max_abs
    )
    return (f"--into {into}: the merged model is max|Δlogit| {gap.max_abs:.3g} (greedy "
            f"agreement {gap.agreement:.1%}) from {trained}; {other}"), far
