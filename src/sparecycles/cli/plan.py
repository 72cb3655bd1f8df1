"""``sparecycles plan``: what a device can do with a model, from the performance model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.table import Table

from sparecycles.cli.common import console, friendly
from sparecycles.ledger import pricing
from sparecycles.scheduling import perfmodel as pm
from sparecycles.scheduling.presets import (
    DEVICE_PRESETS,
    MODEL_PRESETS,
    device_preset,
    model_preset,
)
from sparecycles.types import DeviceProfile, ModelSpec

GB = 1e9
batches_shown = (1, 2, 4, 8, 16, 32, 64, 128)
prompts_shown = (128, 512, 2048, 8192, 32768)


def resolve_model(model: str) -> ModelSpec:
    """A preset name, a model directory (config.json + safetensors) or a GGUF file read by
    modelfiles (a GGUF's bytes per weight from its tensors' own types: Q4_1, Q8_0, ...)."""
    if model in MODEL_PRESETS:
        return MODEL_PRESETS[model]
    path = Path(model)
    if not (path.is_dir() or (path.suffix.lower() == ".gguf" and path.is_file())):
        model_preset(model)  # raises NotFound listing the presets
    from sparecycles.modelfiles import model_spec

    return model_spec(path.name, path, hash_weights=False)


def resolve_device(device: str) -> DeviceProfile:
    """``this`` (measure this machine), a preset name, or a profile JSON a node cached."""
    if device == "this":
        from sparecycles.node.profile import profile_device

        with console.status("measuring this device (a few seconds)"):
            return profile_device(None)
    if device in DEVICE_PRESETS:
        return DEVICE_PRESETS[device]
    path = Path(device)
    if path.is_file():
        data = json.loads(path.read_text())
        return DeviceProfile(**data.get("profile", data))
    return device_preset(device)  # raises NotFound listing the presets


def _ridge_text(ridge: float) -> str:
    if math.isinf(ridge):
        return "none: memory-bound at every batch (KV cache traffic outruns compute)"
    return f"{ridge:.1f}: memory-bound below, compute-bound above"


def _summary(spec: ModelSpec, profile: DeviceProfile, context: int) -> Table:
    table = Table(title=f"{spec.name} on {profile.device_class}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    accel = profile.accelerator or "none (CPU)"
    rows = [
        ("model", f"{spec.n_params / 1e6:,.1f} M params x {spec.bytes_per_param:g} B = "
                  f"{spec.weight_bytes / GB:.3g} GB; KV {pm.kv_bytes_per_token(spec):,} B/token"),
        ("device", f"{accel}; {profile.memory_bandwidth_bytes_per_s / GB:.0f} GB/s, "
                   f"{profile.peak_flops / 1e12:.1f} TFLOP/s, "
                   f"RTT {profile.network_rtt_s * 1e3:.0f} ms"),
        ("memory lent", f"{pm.usable_memory_bytes(profile) / GB:.1f} GB"),
        ("KV cache room", f"{pm.kv_capacity_tokens(spec, profile):,} tokens"),
        ("max context (batch 1)", f"{pm.max_context(spec, profile):,} tokens"),
        (f"max batch at {context:,} tokens", f"{pm.max_batch(spec, profile, context):,}"),
        ("ridge batch", _ridge_text(pm.ridge_batch(spec, profile, context))),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table


def _decode_table(spec: ModelSpec, profile: DeviceProfile, context: int) -> Table:
    table = Table(title=f"decode at {context:,} tokens of context")
    for col in ("batch", "step ms", "tokens/s", "tokens/s each", "bound", "fits"):
        table.add_column(col, justify="right")
    for batch in batches_shown:
        p = pm.roofline(spec, profile, batch, context)
        table.add_row(
            str(batch), f"{p.step_s * 1e3:.1f}", f"{p.tokens_per_s:,.1f}",
            f"{p.tokens_per_s_per_sequence:,.1f}", p.bound, "yes" if p.fits else "no",
        )  # fmt: skip
    return table


def _prefill_table(spec: ModelSpec, profile: DeviceProfile) -> Table:
    table = Table(title="prefill (time to process the prompt)")
    for col in ("prompt tokens", "seconds", "tokens/s"):
        table.add_column(col, justify="right")
    for n in prompts_shown:
        if n > spec.context_length:
            break
        s = pm.prefill_s(spec, profile, n)
        table.add_row(f"{n:,}", f"{s:.3f}", f"{n / s:,.0f}")
    return table


@friendly
def plan(
    model: str = typer.Option(..., "--model", "-m",
                              help="A preset, a model directory or a GGUF file"),
    device: str = typer.Option("this", "--device", "-d", help="this, a preset, or profile JSON"),
    prompt_tokens: int = typer.Option(1000, help="The example request's prompt"),
    output_tokens: int = typer.Option(200, help="The example request's output"),
    batch: int = typer.Option(4, help="Batch for the example request and the earnings"),
) -> None:
    """Predict prefill time, decode speed, memory fit and the roofline bound of a model on a
    device. Presets: models {models}; devices {devices}."""
    spec, profile = resolve_model(model), resolve_device(device)
    context = prompt_tokens + output_tokens // 2
    console.print(_summary(spec, profile, context))
    console.print(_decode_table(spec, profile, context))
    console.print(_prefill_table(spec, profile))
    if pm.kv_capacity_tokens(spec, profile) == 0:
        console.print(
            f"[red]the weights ({spec.weight_bytes / GB:.1f} GB) do not fit in the "
            f"{pm.usable_memory_bytes(profile) / GB:.1f} GB this device lends.[/red]"
        )
        return
    if not pm.fits(spec, profile, batch, prompt_tokens + output_tokens):
        console.print(f"[red]{batch} requests of this size do not fit in memory here.[/red]")
        return
    ttft, total = pm.request_s(spec, profile, prompt_tokens, output_tokens, batch)
    console.print(
        f"one request of {prompt_tokens} + {output_tokens} tokens at batch {batch}: "
        f"first token after {ttft:.2f} s, done after {total:.2f} s"
    )
    price = pricing.tier_price(spec.n_params)
    share = pricing.PriceBook.default().terms.owner_share_ppm / pricing.PPM
    tokens_per_s = pm.decode_tokens_per_s(spec, profile, batch, context)
    per_hour = tokens_per_s * 3600 * price.output_micros_per_mtok / 1e6 * share / 1e6
    console.print(
        f"busy at batch {batch}: {tokens_per_s * 3600 / 1e6:.2f} M output tokens/hour; at the "
        f"default price (${price.output_micros_per_mtok / 1e6:.2f}/M output tokens, "
        f"{share:.0%} to the owner) about ${per_hour:.3f} per busy hour"
    )


if plan.__doc__:
    plan.__doc__ = plan.__doc__.format(
        models=", ".join(MODEL_PRESETS), devices=", ".join(DEVICE_PRESETS)
    )


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
