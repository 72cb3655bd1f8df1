"""Inference backends behind one interface (``base.Engine``): ``transformers`` (PyTorch) and
``llamacpp`` (llama.cpp through llama-cpp-python, GGUF files). Each is an extra
(``sparecycles[torch]``, ``sparecycles[llamacpp]``) and is imported only when chosen."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any


class Backend(enum.StrEnum):
    AUTO = "auto"  # llamacpp for a GGUF file, transformers for a Hugging Face directory
    TRANSFORMERS = "transformers"
    LLAMACPP = "llamacpp"


def choose_backend(source: str | Path, wanted: Backend | str = Backend.AUTO) -> Backend:
    """The backend that serves ``source``: the owner's choice, else by the kind of file."""
    from sparecycles import modelfiles

    wanted = Backend(wanted)
    if wanted is not Backend.AUTO:
        return wanted
    return Backend.LLAMACPP if modelfiles.gguf_source(source) else Backend.TRANSFORMERS


def load_engine(name: str, source: str | Path, backend: Backend | str = Backend.AUTO,
                **options: Any) -> Any:  # -> base.Engine
    """Load ``source`` with ``backend``; ``options`` are the engines' own (device, dtype,
    duty_cycle, threads, ...), those a backend does not take left out."""
    chosen = choose_backend(source, backend)
    if chosen is Backend.LLAMACPP:
        from sparecycles.node.backends.llamacpp import LlamaCppEngine

        keep = {"threads", "batch_size_max", "queue_max", "duty_cycle", "kv_tokens",
                "prefix_cache"}
        return LlamaCppEngine.load(name, source, **{k: v for k, v in options.items()
                                                    if k in keep and v is not None})
    from sparecycles.node.backends.transformers import TransformersEngine

    keep = {"device", "dtype", "batch_size_max", "queue_max", "duty_cycle"}
    return TransformersEngine.load(name, source, **{k: v for k, v in options.items()
                                                    if k in keep and v is not None})
