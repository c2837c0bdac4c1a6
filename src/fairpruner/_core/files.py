"""Reading the library's own files: weights-only torch files that name their format."""
from __future__ import annotations

import os
from typing import Any, Dict, Union

import torch

from .._errors import FairPrunerError

__all__ = ["read_torch_file"]


def read_torch_file(path: Union[str, os.PathLike], fmt: str, hint: str) -> Dict[str, Any]:
    """Loads ``path`` with ``torch.load(weights_only=True)`` and checks that it holds fairpruner's ``fmt``."""
    if not os.path.isfile(path):
        raise FairPrunerError(f"No such file: {path}.")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign or corrupt file fails in many ways inside the unpickler
        raise FairPrunerError(f"{path} is not a readable weights-only torch file ({type(e).__name__}); "
                              f"{hint}.") from None
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise FairPrunerError(f"{path} is not a {fmt} file; {hint}.")
    return d
