"""The ``sparecycles`` command: one typer app; each module adds the commands of one role."""

from __future__ import annotations

import typer

from sparecycles.cli import admin, costs, demo, ledger, loadtest, model, plan, serve, sim

app = typer.Typer(
    name="sparecycles",
    help="An LLM inference network on the spare cycles of devices people already own.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

for _module in (serve, admin, model, demo, ledger, costs, plan, sim, loadtest):
    _module.register(app)
