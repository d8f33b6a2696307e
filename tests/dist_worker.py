"""Entry point for multi-process tests: `torchrun … tests/dist_worker.py train …`.

QORPO_TEST_FAULT (Python source) runs first in every process, before qorpo's CLI, so a test can
inject a failure on one rank at an exact moment. Test-only: nothing in qorpo reads it."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
exec(os.environ.get("QORPO_TEST_FAULT", ""))  # noqa: S102 - the tests' own code

from qorpo.cli import main  # noqa: E402

main()
