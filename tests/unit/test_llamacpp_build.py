"""What the llamacpp backend decides from the llama.cpp library it finds, without loading one:
these run where llama-cpp-python is not installed too."""

from __future__ import annotations

from sparecycles.node.backends.llamacpp import amx_trust_env, extra_buffers_allowed


def test_a_build_with_amx_kernels_loads_weights_without_extra_buffers_unless_trusted() -> None:
    """llama.cpp's AMX kernels crashed the process at the first decode on an AMX CPU: a library
    built with them loads models without the extra buffers that run them, unless trusted."""
    with_amx = "CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | OPENMP = 1 | REPACK = 1 |"
    without = "CPU : AVX2 = 1 | AVX512 = 1 | OPENMP = 1 | REPACK = 1 |"
    assert extra_buffers_allowed(without, {})
    assert not extra_buffers_allowed(with_amx, {})
    assert not extra_buffers_allowed(with_amx, {amx_trust_env: "0"})
    assert extra_buffers_allowed(with_amx, {amx_trust_env: "1"})
