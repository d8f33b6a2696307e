"""The output folder of a training run: what it holds, whether a new run may use it, which
checkpoint a resume continues from, and the markers that make those answers reliable.

A folder is *ours* when it holds `qorpo_run.json`, written when training starts and rewritten
with `finished: true` as the very last step. That file also lists every top-level name the run
wrote (`written`): `--overwrite` removes those and nothing else, so a user's notes or eval
results in the folder survive, and a folder that merely holds a `qorpo_config.yaml` is never
taken for a run. Each checkpoint gets `qorpo_checkpoint.json` after the Trainer has written
everything else in it, listing each file with its size and sha256: a checkpoint without it was
cut short (a kill while saving), one whose files do not match it was damaged or tampered with,
and neither is resumed from. Both markers carry the run's *fingerprint*: the options that change
the result plus the identity of the data, so a resume continues only the run it belongs to.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from qorpo.atomic import replacing, sha256_file
from qorpo.config import TrainConfig
from qorpo.errors import QorpoError
from qorpo.lock import is_lock_file

RUN_FILE = "qorpo_run.json"
CHECKPOINT_MARKER = "qorpo_checkpoint.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "qorpo_config.yaml"
CURVES_FILE = "curves.png"  # the training curves (qorpo.plot), drawn when the run finishes
SAVING = ".saving"  # the adapter is written here, then renamed into the folder (api.save_adapter)
# What a run writes before its adapter exists; the adapter's files are added when it is saved.
# "runs": the Trainer's TensorBoard logs (OUTPUT_DIR/runs/DATE_HOST).
_FIRST_WRITTEN = (CONFIG_FILE, RUN_FILE, METRICS_FILE, SAVING, CURVES_FILE)
# Folders of earlier qorpo versions list nothing: these are the names those versions wrote.
_LEGACY_WRITTEN = (*_FIRST_WRITTEN, "runs", "adapter_config.json", "adapter_model.safetensors",
                   "README.md", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json", "training_args.bin")
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


# ------------------------------------------------------------------------------ fingerprint
def file_identity(source: str | None) -> dict[str, Any] | None:
    """What identifies a data source: a local file's size and sha256, else its name."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        return {"name": source}
    return {"file": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The options that change the trained adapter, and the data's identity."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IN_FINGERPRINT}
    values["data"] = file_identity(cfg.data)
    values["eval_data"] = file_identity(cfg.eval_data)
    return values


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Fingerprint entries that differ. A data file is the same file when its bytes are: a
    copy moved to another path (a new machine, a renamed folder) still continues the run."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys
            if not _same(old.get(k), new.get(k))]


def moved_data(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Notes for data files that are the same bytes at another path."""
    notes = []
    for key in ("data", "eval_data"):
        a, b = old.get(key), new.get(key)
        if _same(a, b) and a != b and isinstance(a, dict) and "file" in a:
            notes.append(f"{key}: {a['file']} is now read from {b['file']} (same sha256)")
    return notes


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict) and "sha256" in a and "sha256" in b:
        return (a["sha256"], a.get("bytes")) == (b["sha256"], b.get("bytes"))
    return a == b


def _short(value: Any) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value['file']} (sha256 {value['sha256'][:12]}…)"
    return repr(value)


# ------------------------------------------------------------------------------ checkpoints
class Checkpoint(NamedTuple):
    path: Path
    step: int
    complete: bool  # the marker is there and every file it lists has its recorded size


def checkpoints(out_dir: Path) -> list[Checkpoint]:
    """checkpoint-N folders, oldest first."""
    found = []
    for p in out_dir.glob("checkpoint-*"):
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir():
            found.append(Checkpoint(p, int(m.group(1)), not _missing_files(p)))
    return sorted(found, key=lambda c: c.step)


def mark_checkpoint(folder: Path, fp: dict[str, Any], step: int) -> None:
    """Written last into a checkpoint: the files it vouches for, with sizes and sha256."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CHECKPOINT_MARKER}
    _write_json(folder / CHECKPOINT_MARKER, {"step": step, "fingerprint": fp, "files": files})


def _missing_files(folder: Path) -> list[str]:
    """What keeps a checkpoint from being complete (cheap: sizes only), [] when complete."""
    marker = _read_json(folder / CHECKPOINT_MARKER)
    if marker is None:
        return [CHECKPOINT_MARKER]
    listed = marker.get("files")
    if listed is None:  # an earlier qorpo's marker: it listed nothing, the state must be there
        return [] if (folder / "trainer_state.json").is_file() else ["trainer_state.json"]
    return [name for name, info in listed.items()
            if not (folder / name).is_file() or (folder / name).stat().st_size != info["bytes"]]


def _damaged_files(folder: Path) -> list[str]:
    """Files whose content is not what the marker recorded (read in full: one checkpoint)."""
    listed = (_read_json(folder / CHECKPOINT_MARKER) or {}).get("files") or {}
    return [name for name, info in listed.items() if sha256_file(folder / name) != info["sha256"]]


# ------------------------------------------------------------------------------ the plan
class RunPlan(NamedTuple):
    """What `plan_output_dir` decided (nothing is written until `start` is called)."""

    out_dir: Path
    resume_from: Path | None
    clear: tuple[Path, ...]  # --overwrite: what the previous run wrote, removed first
    broken: tuple[Path, ...]  # incomplete checkpoints to remove before resuming
    notes: tuple[str, ...]


def resolve_output_dir(cfg: TrainConfig) -> Path:
    """--output-dir with ~ expanded and a symlink resolved: a run writes into (and
    --overwrite clears) the folder the link points to, never the link itself."""
    out = Path(cfg.output_dir).expanduser()
    out = out.resolve() if out.is_symlink() else out
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir {out} is a file, not a folder; choose a folder path.")
    return out


def plan_output_dir(cfg: TrainConfig, fp: dict[str, Any], out: Path | None = None) -> RunPlan:
    """Decide, before anything is loaded, whether this run may use its output folder, and from
    which checkpoint it resumes. Raises RunError with what to do otherwise."""
    out = out if out is not None else resolve_output_dir(cfg)
    contents = sorted(p.name for p in out.iterdir() if not is_lock_file(p.name)) \
        if out.is_dir() else []
    if not contents:
        if cfg.resume is not None and not _explicit_checkpoint(cfg):
            raise RunError(f"--resume {cfg.resume}: {out} holds no run to resume.")
        resume, notes = _resume_path(cfg, out, fp)
        return RunPlan(out, resume, (), (), notes)
    state = _read_json(out / RUN_FILE)
    if state is None:
        raise RunError(f"--output-dir {out} is not empty and holds no qorpo run "
                       f"({', '.join(contents[:4])}{', …' if len(contents) > 4 else ''}); "
                       "choose a new or empty folder.")
    if cfg.overwrite:
        return _plan_overwrite(cfg, out, state)
    done = [c for c in checkpoints(out) if c.complete]
    if cfg.resume is None:
        raise RunError(_occupied(out, state, bool(done)))
    if state.get("finished"):
        raise RunError(f"the run in {out} has finished (step {state.get('step')}); nothing to "
                       "resume. Choose another --output-dir, or --overwrite to start over.")
    broken = tuple(c.path for c in checkpoints(out) if not c.complete)
    notes = tuple(f"{c.name} is incomplete (the run was killed while saving it): skipped "
                  "and removed" for c in broken)
    resume, more = _resume_path(cfg, out, fp)
    return RunPlan(out, resume, (), broken, notes + more)


def _occupied(out: Path, state: dict[str, Any], has_checkpoint: bool) -> str:
    if state.get("finished"):
        return (f"--output-dir {out} already holds a finished run. To keep it, choose another "
                "--output-dir, or pass --overwrite to replace it.")
    if has_checkpoint:
        return (f"--output-dir {out} already holds an unfinished run. To keep it, choose "
                "another --output-dir; continue it with --resume latest, or pass --overwrite "
                "to replace it.")
    return (f"--output-dir {out} already holds an unfinished run that stopped before its first "
            "checkpoint, so there is nothing to resume (checkpoints are written every "
            "--save-steps steps). Choose another --output-dir, or pass --overwrite to start it "
            "again (this replaces the adapter it saved when it stopped).")


def _plan_overwrite(cfg: TrainConfig, out: Path, state: dict[str, Any]) -> RunPlan:
    """--overwrite: the previous run's own files go; anything else in the folder stays."""
    written = set(state.get("written") or _LEGACY_WRITTEN)
    ours = [out / n for n in sorted(written) if (out / n).exists() or (out / n).is_symlink()]
    # checkpoints the run listed, or that carry qorpo's marker (runs from before the list held
    # them); a checkpoint-N folder with neither is not the run's and stays
    ours += [c.path for c in checkpoints(out) if c.path.name not in written
             and (c.path / CHECKPOINT_MARKER).is_file()]
    for path in ours:
        _refuse_if_precious(cfg, path)
    kept = sorted(p.name for p in out.iterdir() if p not in ours and not is_lock_file(p.name))
    notes = [f"--overwrite: the previous run in {out} is removed first"]
    if kept:
        notes.append(f"--overwrite keeps what the previous run did not write: {', '.join(kept)}")
    return RunPlan(out, None, tuple(ours), (), tuple(notes))


def _refuse_if_precious(cfg: TrainConfig, path: Path) -> None:
    """Never remove the current folder, a folder above it, or anything holding this run's own
    inputs (the model, the data, a chat template file)."""
    target = path.resolve()
    inputs = [Path.cwd(), *(Path(p).expanduser() for p in (cfg.model, cfg.data, cfg.eval_data,
                                                          cfg.chat_template) if p)]
    for item in inputs:
        if item.exists() and (item.resolve() == target or target in item.resolve().parents):
            raise RunError(f"--overwrite would remove {path}, which holds {item}; move the "
                           "input or choose another --output-dir.")


def _explicit_checkpoint(cfg: TrainConfig) -> bool:
    return cfg.resume is not None and cfg.resume != "latest"


def _resume_path(cfg: TrainConfig, out: Path,
                 fp: dict[str, Any]) -> tuple[Path | None, tuple[str, ...]]:
    """The checkpoint to resume from (intact, of this run), and notes to print."""
    if cfg.resume is None:
        return None, ()
    notes: list[str] = []
    if cfg.resume == "latest":
        path = None
        for c in reversed([c for c in checkpoints(out) if c.complete]):
            damaged = _damaged_files(c.path)
            if not damaged:
                path = c.path
                break
            notes.append(f"{c.path.name} was changed after it was saved ({', '.join(damaged)} "
                         "differ from its marker): skipped")
        if path is None:
            raise RunError(f"--resume latest: no complete checkpoint-* folder in {out} "
                           "(checkpoints are written every --save-steps steps). Start again "
                           "with --overwrite.")
    else:
        path = Path(cfg.resume).expanduser()
        if not path.is_dir():
            raise RunError(f"--resume {cfg.resume}: no such checkpoint folder.")
        missing = _missing_files(path)
        if missing:
            raise RunError(f"--resume {cfg.resume}: not a complete qorpo checkpoint (missing or "
                           f"cut short: {', '.join(missing[:4])}; it was cut short, copied in "
                           "part, or written by another tool).")
        damaged = _damaged_files(path)
        if damaged:
            raise RunError(f"--resume {cfg.resume}: {', '.join(damaged)} changed after the "
                           "checkpoint was saved (sha256 differs from its marker); resume "
                           "from another checkpoint.")
    saved = (_read_json(path / CHECKPOINT_MARKER) or {}).get("fingerprint", {})
    diff = differences(saved, fp)
    if diff:
        raise RunError(f"{path.name} belongs to a run with other settings, so resuming from it "
                       "would not continue that run:\n  " + "\n  ".join(diff) + "\nResume with "
                       "the same options, or start over with --overwrite.")
    return path, (*notes, *moved_data(saved, fp))


# ------------------------------------------------------------------------------ writing
def start(plan: RunPlan, cfg: TrainConfig, fp: dict[str, Any],
          base_model: dict[str, Any] | None = None) -> list[str]:
    """Make the folder ready: clear (--overwrite), drop broken checkpoints, record the run.
    `base_model`: the architecture trained on (qorpo merge refuses another one). Returns notes
    to print."""
    for path in (*plan.clear, *plan.broken):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(plan.out_dir / CONFIG_FILE, cfg.yaml_text())
    step, notes = 0, []
    state: dict[str, Any] = {}
    if plan.resume_from is not None:
        step = int(_CHECKPOINT.match(plan.resume_from.name).group(1))  # type: ignore[union-attr]
        if trim_metrics(plan.out_dir / METRICS_FILE, step):
            notes.append(f"{METRICS_FILE}: dropped a record cut short when the run was stopped")
        state = _read_json(plan.out_dir / RUN_FILE) or {}
    else:
        (plan.out_dir / METRICS_FILE).unlink(missing_ok=True)
    written = set(state.get("written") or ()) | set(_FIRST_WRITTEN)
    if "tensorboard" in cfg.report_to or "all" in cfg.report_to:
        written.add("runs")
    _write_json(plan.out_dir / RUN_FILE, {
        "finished": False, "step": step, "fingerprint": fp, "written": sorted(written),
        "base_model": base_model or state.get("base_model")})
    return notes


def record_written(out_dir: Path, names: list[str]) -> None:
    """Add top-level names (the adapter's files) to what the run wrote."""
    state = _read_json(out_dir / RUN_FILE) or {}
    state["written"] = sorted(set(state.get("written") or ()) | set(names))
    _write_json(out_dir / RUN_FILE, state)


def finish(out_dir: Path, step: int) -> None:
    """Written last: the folder now holds a finished run."""
    state = _read_json(out_dir / RUN_FILE) or {}
    _write_json(out_dir / RUN_FILE, {**state, "finished": True, "step": step})


def trim_metrics(path: Path, step: int) -> int:
    """Drop records after `step` (the resumed run logs those steps again) and any line cut
    short by a kill mid-write. Returns how many unreadable lines were dropped."""
    if not path.is_file():
        return 0
    kept, unreadable = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    _write_text(path, "".join(line + "\n" for line in kept))
    return unreadable


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    _write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Temp file + rename: a kill leaves the old file or the new one, never half of one."""
    with replacing(path) as tmp:
        tmp.write_text(text)
