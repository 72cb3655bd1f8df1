"""``sparecycles demo``: the whole network on this machine, from one command."""

from __future__ import annotations

from pathlib import Path

import typer

from sparecycles.cli.common import console, friendly


@friendly
def demo(
    root: Path = typer.Option(Path(".sparecycles/demo"), help="Folder for the run's files"),
    requests: int = typer.Option(6, min=1, max=64, help="How many chat requests to send"),
    model: str = typer.Option("smollm2", help="smollm2 (a real 135M instruct model, GGUF) or tiny"),
    model_dir: Path = typer.Option(None, help="Serve this model directory or GGUF file instead"),
) -> None:
    """Start a coordinator and two nodes serving SmolLM2, send real requests, show the money."""
    from sparecycles.tools.demo import run_demo

    run_demo(root, model=model, model_dir=model_dir, requests=requests, console=console)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
