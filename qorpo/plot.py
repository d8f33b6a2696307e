"""Training curves from metrics.jsonl: loss, NLL, L_OR, reward accuracy, margin and log odds
ratio, train and eval (the eval before training as a star), x = optimizer step, several runs
overlaid.

matplotlib's object API (a Figure with the Agg canvas, no pyplot): no display, no global
state, the same call in a terminal, a thread or a notebook (which shows the returned Figure).
The PNG carries what it shows as text metadata (key "qorpo": JSON with the panels, the runs
and the points per series), so a test or a script can check a plot without looking at it.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qorpo._version import __version__
from qorpo.errors import QorpoError
from qorpo.runs import CURVES_FILE, METRICS_FILE  # curves: RUN/curves.png (plot, train)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (metric key in metrics.jsonl, panel title); eval records carry the same keys with "eval_"
PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "ORPO loss (NLL + β·L_OR)"), ("nll", "NLL of chosen"),
    ("ratio_loss", "L_OR = −log σ(log odds ratio)"), ("rewards/accuracy", "reward accuracy"),
    ("rewards/margin", "reward margin β(ℓw − ℓl)"), ("log_odds", "log odds ratio"))
METADATA_KEY = "qorpo"


class PlotError(QorpoError):
    """A run without metrics, or an output file qorpo would not overwrite."""


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl. A live run's half-written last line is skipped;
    if the steps start over (an older file appended to), only the last run is kept."""
    path = Path(run).expanduser()
    file = path if path.is_file() else path / METRICS_FILE
    if not file.is_file():
        raise PlotError(f"{run}: no {METRICS_FILE} (give a folder qorpo train writes to; its "
                        "first record appears at the first logging step)")
    records: list[dict[str, Any]] = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int | float):
            continue
        if records and record["step"] < records[-1]["step"]:
            records = []
        records.append(record)
    return records


def series(records: list[dict[str, Any]], key: str) -> dict[str, list[tuple[float, float]]]:
    """(step, value) points of one metric: train, eval after training started, eval before."""
    train = [(r["step"], r[key]) for r in records
             if key in r and "loss" in r and "train_runtime" not in r]
    evals = [(r["step"], r[f"eval_{key}"]) for r in records if f"eval_{key}" in r]
    return {"train": train, "eval": [p for p in evals if p[0] > 0],
            "eval_before": [p for p in evals if p[0] == 0][:1]}


def _label(run: Path, runs: Sequence[Path]) -> str:
    names = [r.name for r in runs]
    return run.name if names.count(run.name) == 1 else str(run)


def plot_runs(runs: Sequence[str | Path], *, title: str | None = None,
              labels: Sequence[str] | None = None) -> Figure:
    """One figure, a panel per metric, every run in its own colour (named by its folder, or by
    `labels`)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    paths = [Path(r).expanduser() for r in runs]
    if not paths:
        raise PlotError("no run to plot")
    data = {p: read_metrics(p) for p in paths}
    names = list(labels) if labels else [_label(p, paths) for p in paths]
    if len(names) != len(paths):
        raise PlotError(f"{len(names)} labels for {len(paths)} runs")
    # A fixed grid, not layout="constrained": that measures every label with a draw of its own
    # and was 0.8 of the 1.6 s a run's curves took (a tiny run trains in 1 s).
    fig = Figure(figsize=(13.5, 8.0))
    axes = fig.subplots(2, 3, gridspec_kw=dict(left=0.05, right=0.98, top=0.9, bottom=0.13,
                                               hspace=0.32, wspace=0.2)).ravel()
    colors = [f"C{i % 10}" for i in range(len(paths))]
    meta: dict[str, Any] = {"panels": [k for k, _ in PANELS], "titles": [t for _, t in PANELS],
                            "x": "optimizer step", "runs": {}}
    for path, color, label in zip(paths, colors, names, strict=True):
        counts = meta["runs"].setdefault(label, {})
        for ax, (key, _) in zip(axes, PANELS, strict=True):
            s = series(data[path], key)
            counts[key] = {k: len(v) for k, v in s.items()}
            if s["train"]:
                ax.plot(*zip(*s["train"], strict=True), "-", color=color, lw=1.5)
            evals = s["eval_before"] + s["eval"]  # the eval line starts before training
            if s["eval"]:
                ax.plot(*zip(*evals, strict=True), "o--", color=color, ms=5)
            if s["eval_before"]:
                ax.plot(*zip(*s["eval_before"], strict=True), "*", color=color, ms=13,
                        markeredgecolor="black")
    for ax, (_, panel_title) in zip(axes, PANELS, strict=True):
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, lw=2, label=n) for n, c in zip(names, colors, strict=True)]
    handles += [Line2D([], [], color="gray", ls="-", label="train"),
                Line2D([], [], color="gray", ls="--", marker="o", label="eval"),
                Line2D([], [], color="gray", ls="", marker="*", ms=12, markeredgecolor="black",
                       label="eval before training")]
    fig.legend(handles=handles, loc="lower center", ncols=min(len(handles), 6),
               fontsize=9, frameon=False)
    fig.suptitle(title or "qorpo: " + ", ".join(names))
    fig._qorpo_meta = meta  # type: ignore[attr-defined]  (save_plot writes it into the PNG)
    return fig


def save_plot(fig: Figure, out: str | Path) -> Path:
    """Write the PNG through a temp file and rename (a reader never sees half of it)."""
    from qorpo.atomic import replacing

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = getattr(fig, "_qorpo_meta", {})
    with replacing(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={
            "Title": fig.get_suptitle(), "Software": f"qorpo {__version__}",
            METADATA_KEY: json.dumps(meta)})
    return out


def png_text(path: str | Path) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG; raises ValueError if it is not a PNG."""
    blob = Path(path).read_bytes()
    if blob[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    out, pos = {}, 8
    while pos + 8 <= len(blob):
        size, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        body = blob[pos + 8:pos + 8 + size]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"zTXt":
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = zlib.decompress(value[1:]).decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            _, _, rest = rest.partition(b"\0")  # language tag
            _, _, text = rest.partition(b"\0")  # translated keyword
            out[key.decode("latin-1")] = (zlib.decompress(text) if compressed
                                          else text).decode("utf-8")
        pos += 12 + size
    return out


def is_qorpo_plot(path: Path) -> bool:
    try:
        return METADATA_KEY in png_text(path)
    except (OSError, ValueError):
        return False


def write_curves(runs: Sequence[str | Path], out: str | Path | None = None, *,
                 force: bool = False) -> Path:
    """Plot `runs` into `out` (default: RUN/curves.png for one run, ./curves.png for several).
    A file there that is not a qorpo plot is replaced only with `force`."""
    paths = [Path(r).expanduser() for r in runs]
    if out is None:
        out = paths[0] / CURVES_FILE if len(paths) == 1 and paths[0].is_dir() else Path(
            CURVES_FILE)
    out = Path(out).expanduser()
    if out.is_dir():
        raise PlotError(f"--out {out} is a folder; give a file name ending in .png")
    if out.exists() and not force and not is_qorpo_plot(out):
        raise PlotError(f"{out} exists and is not a qorpo plot: choose another --out, or pass "
                        "--force to replace it")
    fig = plot_runs(paths)
    return save_plot(fig, out)


def plot_finished_run(out_dir: Path) -> str | None:
    """The end of `qorpo train`: RUN/curves.png. Returns a note if it could not be drawn (a
    plot never fails a finished run)."""
    try:
        write_curves([out_dir], out_dir / CURVES_FILE, force=True)
    except Exception as exc:  # noqa: BLE001 - reported as a note; the run itself is done
        return f"no {CURVES_FILE}: {exc}"
    return None
