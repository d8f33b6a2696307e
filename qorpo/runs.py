"""The output folder of a training run: what it holds, whether a new run may use it, which
checkpoint a resume continues from, and the markers that make those answers reliable.

A folder is *ours* when it holds `qorpo_run.json`, written when training starts and rewritten
with `finished: true` as the very last step. Each checkpoint gets `qorpo_checkpoint.json` after
the Trainer has written everything else in it, so a checkpoint without it was cut short (a kill
while saving) and is never resumed from. Both carry the run's *fingerprint*: the options that
change the result plus the identity of the data, so a resume continues only the run it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from qorpo.config import TrainConfig
from qorpo.errors import QorpoError

RUN_FILE = "qorpo_run.json"
CHECKPOINT_MARKER = "qorpo_checkpoint.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "qorpo_config.yaml"
# Options that change where and how often things are written, or how fast and in how much
# memory the same steps run (exact: the layouts, the loss chunking, checkpointing), not what
# is learned. A run may resume with other values of these.
NOT_IN_FINGERPRINT = frozenset({"output_dir", "logging_steps", "save_steps", "save_total_limit",
                                "report_to", "resume", "overwrite", "eval_steps",
                                "prefix_sharing", "packing", "chunk_size",
                                "gradient_checkpointing", "low_cpu_memory", "gpu_memory"})
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


class RunError(QorpoError):
    """The output folder or checkpoint cannot be used as asked."""


def file_identity(source: str | None) -> dict[str, Any] | None:
    """What identifies a data source: a local file's size and sha256, else its name."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        return {"name": source}
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"file": str(path.resolve()), "bytes": path.stat().st_size,
            "sha256": digest.hexdigest()}


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The options that change the trained adapter, and the data's identity."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IN_FINGERPRINT}
    values["data"] = file_identity(cfg.data)
    values["eval_data"] = file_identity(cfg.eval_data)
    return values


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys
            if old.get(k) != new.get(k)]


def _short(value: Any) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value['file']} (sha256 {value['sha256'][:12]}…)"
    return repr(value)


class Checkpoint(NamedTuple):
    path: Path
    step: int
    complete: bool


def checkpoints(out_dir: Path) -> list[Checkpoint]:
    """checkpoint-N folders, oldest first; complete = the marker was written last."""
    found = []
    for p in out_dir.glob("checkpoint-*"):
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir():
            found.append(Checkpoint(p, int(m.group(1)), (p / CHECKPOINT_MARKER).is_file()))
    return sorted(found, key=lambda c: c.step)


def mark_checkpoint(folder: Path, fp: dict[str, Any], step: int) -> None:
    _write_json(folder / CHECKPOINT_MARKER, {"step": step, "fingerprint": fp})


class RunPlan(NamedTuple):
    """What `prepare_output_dir` decided (nothing is written until `start` is called)."""

    out_dir: Path
    resume_from: Path | None
    clear: bool  # --overwrite on a folder holding a run: remove it first
    broken: tuple[Path, ...]  # incomplete checkpoints to remove before resuming
    notes: tuple[str, ...]


def plan_output_dir(cfg: TrainConfig, fp: dict[str, Any]) -> RunPlan:
    """Decide, before anything is loaded, whether this run may use cfg.output_dir, and from
    which checkpoint it resumes. Raises RunError with what to do otherwise."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir {out} is a file, not a folder; choose a folder path.")
    contents = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not contents:
        if cfg.resume is not None and not _explicit_checkpoint(cfg):
            raise RunError(f"--resume {cfg.resume}: {out} holds no run to resume.")
        return RunPlan(out, _resume_path(cfg, out, fp), False, (), ())
    ours = (out / RUN_FILE).is_file() or (out / CONFIG_FILE).is_file()
    if not ours:
        raise RunError(f"--output-dir {out} is not empty and holds no qorpo run "
                       f"({', '.join(contents[:4])}{', …' if len(contents) > 4 else ''}); "
                       "choose a new or empty folder.")
    if cfg.overwrite:
        return RunPlan(out, None, True, (), (f"--overwrite: the previous run in {out} is "
                                             "removed first",))
    state = _read_json(out / RUN_FILE) or {}
    if cfg.resume is None:
        what = "a finished run" if state.get("finished") else "an unfinished run"
        hint = "" if state.get("finished") else " continue it with --resume latest,"
        raise RunError(f"--output-dir {out} already holds {what}. To keep it, choose another "
                       f"--output-dir;{hint} or pass --overwrite to replace it.")
    if state.get("finished"):
        raise RunError(f"the run in {out} has finished (step {state.get('step')}); nothing to "
                       "resume. Choose another --output-dir, or --overwrite to start over.")
    broken = tuple(c.path for c in checkpoints(out) if not c.complete)
    notes = tuple(f"{c.name} is incomplete (the run was killed while saving it): skipped "
                  "and removed" for c in broken)
    return RunPlan(out, _resume_path(cfg, out, fp), False, broken, notes)


def _explicit_checkpoint(cfg: TrainConfig) -> bool:
    return cfg.resume is not None and cfg.resume != "latest"


def _resume_path(cfg: TrainConfig, out: Path, fp: dict[str, Any]) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        done = [c for c in checkpoints(out) if c.complete]
        if not done:
            raise RunError(f"--resume latest: no complete checkpoint-* folder in {out} "
                           "(checkpoints are written every --save-steps steps).")
        path = done[-1].path
    else:
        path = Path(cfg.resume).expanduser()
        if not path.is_dir():
            raise RunError(f"--resume {cfg.resume}: no such checkpoint folder.")
        if not (path / CHECKPOINT_MARKER).is_file():
            raise RunError(f"--resume {cfg.resume}: not a complete qorpo checkpoint (no "
                           f"{CHECKPOINT_MARKER}; it was cut short or written by another tool).")
    saved = (_read_json(path / CHECKPOINT_MARKER) or {}).get("fingerprint", {})
    diff = differences(saved, fp)
    if diff:
        raise RunError(f"{path.name} belongs to a run with other settings, so resuming from it "
                       "would not continue that run:\n  " + "\n  ".join(diff) + "\nResume with "
                       "the same options, or start over with --overwrite.")
    return path


def start(plan: RunPlan, cfg: TrainConfig, fp: dict[str, Any]) -> None:
    """Make the folder ready: clear (--overwrite), drop broken checkpoints, record the run."""
    if plan.clear:
        shutil.rmtree(plan.out_dir)
    for folder in plan.broken:
        shutil.rmtree(folder, ignore_errors=True)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(plan.out_dir / CONFIG_FILE)
    step = 0
    if plan.resume_from is not None:
        step = int(_CHECKPOINT.match(plan.resume_from.name).group(1))  # type: ignore[union-attr]
        trim_metrics(plan.out_dir / METRICS_FILE, step)
    else:
        (plan.out_dir / METRICS_FILE).unlink(missing_ok=True)
    _write_json(plan.out_dir / RUN_FILE, {"finished": False, "step": step, "fingerprint": fp})


def finish(out_dir: Path, fp: dict[str, Any], step: int) -> None:
    """Written last: the folder now holds a finished run."""
    _write_json(out_dir / RUN_FILE, {"finished": True, "step": step, "fingerprint": fp})


def trim_metrics(path: Path, step: int) -> None:
    """Drop records after `step`: the resumed run logs those steps again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    _write_text(path, "".join(line + "\n" for line in kept))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    _write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Temp file + rename: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
