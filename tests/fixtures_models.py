"""Model fixtures shared by the test tiers: the tiny model, built once and cached on disk.

Wire into ``tests/conftest.py`` with ``pytest_plugins = ["fixtures_models"]`` (pytest puts
``tests/`` on ``sys.path`` because of that conftest).

Building the tiny model trains it (~20 s of one core, ~40 s on a busy machine), so a build is
kept in a cache directory and reused by every later session: ``$SPARECYCLES_TEST_CACHE``, else
``$XDG_CACHE_HOME/sparecycles/test-models``, else ``~/.cache/sparecycles/test-models``. An entry
is keyed by preset and seed, and by a digest of what decides the bytes (the builder's source, its
corpus, the torch/transformers/tokenizers versions), so a change to any of them builds afresh
instead of reusing a stale model. A build goes to a temporary directory beside the entry and is
renamed into place when complete: sessions that race each build one and keep the first. Delete
the directory to start from nothing. ``SPARECYCLES_TINY_MODEL=/some/dir`` still names a directory
to use (built there if empty).

On a fresh machine the session that needs the model and finds no cache starts the build at once
in a background process (one core: training is single-threaded) and runs the tests that do not
need the model first, so the build overlaps them instead of adding to them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import pytest

tiny_model_env = "SPARECYCLES_TINY_MODEL"
cache_env = "SPARECYCLES_TEST_CACHE"
_last_file_written = "tokenizer_config.json"  # build_tiny_model writes it last: a complete build

_built: dict[tuple[str, int], Path] = {}  # one lookup per process, even if registered twice


def cache_root() -> Path:
    if named := os.environ.get(cache_env):
        return Path(named)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparecycles" / "test-models"


def builder_digest() -> str:
    """12 hex digits over what decides a built model's bytes (read without importing torch)."""
    spec = importlib.util.find_spec("sparecycles.tools.tinymodel")
    assert spec is not None and spec.origin is not None
    h = hashlib.sha256()
    h.update(Path(spec.origin).read_bytes())
    h.update(resources.files("sparecycles").joinpath("data", "corpus.txt").read_bytes())
    for package in ("torch", "transformers", "tokenizers"):
        h.update(f"{package}={metadata.version(package)};".encode())
    return h.hexdigest()[:12]


def model_dir(preset: str = "tiny", seed: int = 0) -> Path:
    """Where the cache keeps ``preset`` built with ``seed`` (complete or not there at all)."""
    return cache_root() / f"{preset}-seed{seed}-{builder_digest()}"


def cached_model(preset: str = "tiny", seed: int = 0) -> Path:
    """The directory of ``preset`` built with ``seed``, from the cache or built into it."""
    if (preset, seed) in _built:
        return _built[preset, seed]
    final = model_dir(preset, seed)
    root = final.parent
    if not (final / _last_file_written).is_file():
        from sparecycles.tools.tinymodel import build_tiny_model  # imports torch: only here

        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            build_tiny_model(partial, preset=preset, seed=seed)
            try:
                partial.rename(final)  # atomic: a reader sees all of it or nothing
            except OSError:  # another session renamed its build first: use that one
                if not (final / _last_file_written).is_file():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    _built[preset, seed] = final
    return final


_background: subprocess.Popen[bytes] | None = None  # the build started at collection


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Without a cached tiny model, start building it now in another process and run the
    tests that need it last."""
    global _background
    if os.environ.get(tiny_model_env) or _background is not None:
        return
    needs = [item for item in items if "tiny_model_path" in getattr(item, "fixturenames", ())]
    if not needs or (model_dir("tiny", 0) / _last_file_written).is_file():
        return
    _background = subprocess.Popen(
        [sys.executable, "-c", "import fixtures_models as f; f.cached_model('tiny', 0)"],
        cwd=Path(__file__).parent, stdout=subprocess.DEVNULL)
    first = [item for item in items if item not in needs]
    items[:] = first + needs


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """A session that stopped before needing the model still lets its build finish (the next
    session uses it), rather than leaving a process behind."""
    if _background is not None:
        _background.wait()


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """A directory with the tiny preset (seed 0), loadable with the Auto classes."""
    configured = os.environ.get(tiny_model_env)
    if not configured:
        if _background is not None:
            _background.wait()  # a failed build is done again here, and its error raised
        return cached_model("tiny", 0)
    from sparecycles.tools.tinymodel import build_tiny_model

    path = Path(configured)
    if not (path / _last_file_written).is_file():
        build_tiny_model(path)
    return path
