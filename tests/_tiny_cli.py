"""`lalora` in a real process with the tests' tiny task registered (for tests that need a run to
be under way in a separate process: Ctrl-C, resume). Usage: python tests/_tiny_cli.py run ..."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from test_federated import tiny_task  # noqa: E402

from lalora.cli import main  # noqa: E402
from lalora.tasks import TASKS  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    TASKS["tiny"] = lambda **kw: tiny_task()
    sys.exit(main())
