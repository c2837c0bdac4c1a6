"""``python -m fairpruner.cli``: the command line (used by torchrun, which runs modules)."""
import sys

from . import main

sys.exit(main())
