"""The Colab notebook, executed end to end on the CPU with a tiny local model and data.

The parameters cell is swapped for tiny values; every other cell runs exactly as committed, so a
broken import, a renamed API argument or a plotting error fails here, not on a user's T4.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

from tests.tiny import make_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "qorpo_colab.ipynb"


def _parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell must be tagged 'parameters'"
    return cells[0]


def _assigned_names(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def test_committed_notebook_is_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0] is _parameters_cell(nb), "the parameters cell must be the first code cell"
    for cell in code:  # outputs stay out of git: no stale results, no tokens, small diffs
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    names = _assigned_names(code[0].source)
    assert {"MODEL", "DATA", "SPLIT", "EVAL_SPLIT", "MAX_SAMPLES", "MAX_LENGTH",
            "MAX_PROMPT_LENGTH", "MAX_STEPS", "OUTPUT_DIR", "INSTALL", "PUSH_TO_HUB",
            "HUB_REPO"} <= names
    params = {}
    exec(code[0].source, params)  # plain assignments only: safe to evaluate
    assert params["INSTALL"] is True and params["PUSH_TO_HUB"] is False
    assert params["MAX_PROMPT_LENGTH"] < params["MAX_LENGTH"]


def write_ultrafeedback_folder(root: Path, n_train: int = 24, n_test: int = 8) -> Path:
    """A local dataset folder laid out like HuggingFaceH4/ultrafeedback_binarized: the same
    columns and the splits train_prefs / test_prefs, declared in the README's YAML header, so
    `datasets.load_dataset(folder, split="test_prefs[:4]")` goes the hub dataset's code path."""
    (root / "data").mkdir(parents=True)
    for split, n, offset in (("train_prefs", n_train, 0), ("test_prefs", n_test, 1000)):
        with (root / "data" / f"{split}.jsonl").open("w") as f:
            for i in range(offset, offset + n):
                a, b = i % 10, (3 * i) % 10
                prompt = f"question {i}: what is {a} + {b}?"
                chosen = f"yes, the answer is {a + b}."
                rejected = f"stone river {a} maybe {b} cloud"
                f.write(json.dumps({
                    "prompt": prompt, "prompt_id": f"{i:04d}",
                    "chosen": [{"role": "user", "content": prompt},
                               {"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": rejected}],
                    "messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": chosen}],
                    "score_chosen": 8.0, "score_rejected": 3.0,
                }) + "\n")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train_prefs\n    path: data/train_prefs.jsonl\n"
        "  - split: test_prefs\n    path: data/test_prefs.jsonl\n---\n")
    return root


def _kernel_spec(spec_dir: Path, env: dict[str, str]) -> str:
    """A kernelspec that runs this interpreter's ipykernel (not whatever `python` is on PATH)."""
    name = "qorpo-test"
    (spec_dir / name).mkdir(parents=True)
    (spec_dir / name / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "qorpo test kernel", "language": "python", "env": env,
    }))
    return name


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    model = make_model(tmp_path / "tiny-model", arch="llama")
    data = write_ultrafeedback_folder(tmp_path / "ultrafeedback-like")
    out, merged = tmp_path / "run", tmp_path / "run-merged"

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = _parameters_cell(nb)
    test_params = f"""
MODEL = {str(model)!r}
DATA = {str(data)!r}
SPLIT = "train_prefs"
EVAL_SPLIT = "test_prefs"
MAX_EVAL_SAMPLES = 4
MAX_SAMPLES = 8
MAX_LENGTH = 48
MAX_PROMPT_LENGTH = 24
MAX_STEPS = 2
BATCH_SIZE = 2
GRAD_ACCUM = 2
LEARNING_RATE = 5e-3
OUTPUT_DIR = {str(out)!r}
MERGED_DIR = {str(merged)!r}
VERIFY_MERGE = None
PROMPT = "what is 2 + 3?"
MAX_NEW_TOKENS = 8
INSTALL = False
PUSH_TO_HUB = False
HUB_REPO = ""
"""
    # the stand-in must set exactly the notebook's parameters, or the test has drifted
    assert _assigned_names(test_params) == _assigned_names(params.source)
    params.source = test_params

    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets-cache"),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "OMP_NUM_THREADS": "1", "HF_TOKEN": "",  # one thread: see tests/conftest.py
    }
    spec_dir = tmp_path / "kernels"
    km = KernelManager(kernel_name=_kernel_spec(spec_dir, env),
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)]))
    client = NotebookClient(nb, km=km, timeout=300, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell

    def text_of(cell: nbformat.NotebookNode) -> str:
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    code = [c for c in nb.cells if c.cell_type == "code"]
    by_source = {key: next(c for c in code if key in c.source)
                 for key in ("plot_runs(", "qorpo.merge(result.output_dir", "model.generate(")}

    # training wrote the adapter and the metrics the plot reads
    assert (out / "adapter_model.safetensors").is_file()
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2]
    assert any("eval_rewards/accuracy" in r for r in logs)

    # the plot cell drew an image
    plot_outputs = by_source["plot_runs("].outputs
    assert any("image/png" in o.get("data", {}) for o in plot_outputs), plot_outputs

    # the merged folder is a plain transformers model, verified against base + adapter
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert "OK" in text_of(by_source["qorpo.merge(result.output_dir"])

    # generation from the merged folder printed a reply
    assert "assistant:" in text_of(by_source["model.generate("])
