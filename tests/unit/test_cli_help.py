"""The commands' help text says what it means: rich markup must not swallow a literal
``[table]`` or ``[default]`` in it."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sparecycles.cli import app


@pytest.mark.parametrize("command, table", [("coordinator", "[coordinator]"),
                                            ("node", "[node]")])
def test_help_shows_the_config_files_table(command: str, table: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"],
                                env={"TERMINAL_WIDTH": "240", "COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"TOML file with a {table} table" in text
    if command == "coordinator":
        assert "Address to listen on [127.0.0.1]" in text and "Port [8000]" in text



def test_an_error_line_keeps_its_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    """A one-line error prints a message with "[node]" in it whole (rich markup escaped)."""
    import typer

    from sparecycles.cli.common import one_line_errors

    with pytest.raises(typer.Exit), one_line_errors():
        raise ValueError("the file has no [node] table")
    assert "the file has no [node] table" in " ".join(capsys.readouterr().err.split())
