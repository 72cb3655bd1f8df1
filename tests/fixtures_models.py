"""Model fixtures shared by the test tiers: the tiny model, built once per test session.

Wire into ``tests/conftest.py`` with ``pytest_plugins = ["fixtures_models"]`` (pytest puts
``tests/`` on ``sys.path`` because of that conftest). Building takes ~20 s on two cores; set
``SPARECYCLES_TINY_MODEL=/some/dir`` to build it there once and reuse it across sessions.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

tiny_model_env = "SPARECYCLES_TINY_MODEL"
_last_file_written = "tokenizer_config.json"  # build_tiny_model writes it last: a complete build

_built: dict[str, Path] = {}  # one build per process, even if this module is registered twice


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the tiny preset (seed 0), loadable with the Auto classes."""
    from sparecycles.tools.tinymodel import build_tiny_model  # imports torch: only when asked for

    if "tiny" in _built:
        return _built["tiny"]
    configured = os.environ.get(tiny_model_env)
    if configured:
        path = Path(configured)
        if not (path / _last_file_written).is_file():
            build_tiny_model(path)
    else:
        path = build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    _built["tiny"] = path
    return path
