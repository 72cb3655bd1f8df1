"""Models: build the small local model that tests and the demo run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sparecycles.cli.common import console, friendly

model_app = typer.Typer(help="Build and inspect models.", no_args_is_help=True)


@model_app.command("tiny")
@friendly
def tiny(
    path: Path = typer.Argument(..., help="Folder to write the model into"),
    preset: str = typer.Option("tiny", help="tiny (a few M params, trained briefly) or medium"),
    seed: int = typer.Option(0, help="Same seed, same bytes"),
) -> None:
    """Write a small Llama-architecture model with a real tokenizer (Hugging Face layout)."""
    from sparecycles.tools.tinymodel import build_tiny_model

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(f"building {preset} model", total=None, loss="")

        def report(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, loss=f"loss {loss:.2f}")

        out = build_tiny_model(path, preset=preset, seed=seed, progress=report)
    console.print(f"model written to {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
