"""What every command shares: one-line errors, logging set-up, the database option."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from sparecycles.errors import SpareCyclesError
from sparecycles.settings import default_database_url

console = Console()
err_console = Console(stderr=True)

DatabaseOption = typer.Option(
    None, "--database", help="SQLAlchemy URL; default $SPARECYCLES_DATABASE or ./.sparecycles"
)


def database_url(value: str | None) -> str:
    return value or default_database_url()


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Expected failures end the command with one clear line and exit code 1."""
    try:
        yield
    except SpareCyclesError as exc:
        err_console.print(f"[red]error:[/red] {escape(exc.message)}")
        raise typer.Exit(1) from None
    except (OSError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with one_line_errors():
            return fn(*args, **kwargs)

    return wrapper
