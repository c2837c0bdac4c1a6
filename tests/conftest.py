"""Shared test set-up.

Test modules live in packages mirroring ``src/fairpruner`` (``tests/scoring/__init__.py`` and so on, so that equal
basenames in two folders do not clash); ``tests/`` itself is no package, so pytest puts it on ``sys.path`` and
every module imports the shared builders as ``helpers``. ``src/`` is put there too when the package is not
installed.
"""
import sys
from pathlib import Path

import pytest
import torch

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test: deterministic kernels and no oversubscription on small CI machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
