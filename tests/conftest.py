from __future__ import annotations

import os

import pytest
import torch

# Tests run offline and on the CPU, deterministically.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread. OpenMP's second thread costs far more than it gives on these
# shapes, and on a busy 2-core machine a spinning thread makes a 3 ms forward take 500 ms.
torch.set_num_threads(1)


@pytest.fixture
def tiny_tokenizer(tmp_path):
    from tests.tiny import make_tokenizer

    return make_tokenizer(tmp_path / "tok")


@pytest.fixture
def tiny_llama(tmp_path):
    from tests.tiny import make_model

    return make_model(tmp_path / "llama", arch="llama")


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after). Tiny models gain nothing from threads,
    and on a busy machine OpenMP barriers between two threads cost ~100x (2.6 ms vs 550 ms per
    forward measured here). A test file opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
