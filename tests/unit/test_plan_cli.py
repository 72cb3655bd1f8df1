"""``sparecycles plan`` with a preset device and with a profile a node measured and cached."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from typer.testing import CliRunner

from sparecycles.cli import app
from sparecycles.modelfiles import model_spec
from sparecycles.scheduling import perfmodel as pm
from sparecycles.scheduling.presets import DEVICE_PRESETS


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["plan", *args])
    return result.exit_code, result.output


def test_plan_with_presets() -> None:
    code, out = run("--model", "llama-3-8b-q4", "--device", "gaming-pc")
    assert code == 0, out
    assert "decode at" in out and "prefill" in out and "per busy hour" in out


def test_plan_with_a_measured_profile_of_the_tiny_model(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    """A profile as node/profile.py caches it (JSON lists for the linear layers by rows, the
    engine's overhead terms): plan reads it, and predicts what the performance model does."""
    profile = replace(
        DEVICE_PRESETS["laptop-cpu"],
        matmul_flops_by_rows=((1, 8e9), (8, 38e9), (256, 170e9), (2048, 185e9)),
        matmul_bytes_per_param=4.0,
        overhead_step_s=3e-4,
        overhead_layer_s=1.4e-4,
        overhead_sequence_layer_s=1.2e-4,
        overhead_context_layer_s=6e-11,
    )
    cached = tmp_path / "profile.json"
    cached.write_text(json.dumps({"fingerprint": {}, "profile": asdict(profile)}))
    code, out = run("--model", str(tiny_model_path), "--device", str(cached),
                    "--prompt-tokens", "100", "--output-tokens", "20", "--batch", "1")  # fmt: skip
    assert code == 0, out
    spec = model_spec(tiny_model_path.name, tiny_model_path, hash_weights=False)
    step_ms = pm.decode_step_s(spec, profile, 1, 110) * 1e3
    assert step_ms > 1.0  # the engine's overhead, not the roofline's microseconds
    assert f"{step_ms:.1f}" in out
