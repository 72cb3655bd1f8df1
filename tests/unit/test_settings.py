"""Configuration: flags over environment over the TOML file over defaults, through the real
``sparecycles coordinator`` and ``sparecycles node`` commands (nothing is started: the step
after the settings are built is replaced by one that records them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sparecycles.cli import app
from sparecycles.cli import serve as serve_cli
from sparecycles.settings import CoordinatorSettings, NodeSettings


class _Built(Exception):
    """Raised where the command would start serving, carrying the settings it built."""

    def __init__(self, settings: Any):
        self.settings = settings


@pytest.fixture
def no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPARECYCLES_CONFIG", "SPARECYCLES_PORT", "SPARECYCLES_HOST",
                 "SPARECYCLES_LOG_LEVEL", "SPARECYCLES_NODE_JOBS_MAX", "SPARECYCLES_NODE_NAME"):
        monkeypatch.delenv(name, raising=False)


def _coordinator_settings(monkeypatch: pytest.MonkeyPatch, *args: str) -> CoordinatorSettings:
    import sparecycles.api.app as api_app

    def record(settings: CoordinatorSettings, *_a: Any, **_kw: Any) -> Any:
        raise _Built(settings)

    monkeypatch.setattr(api_app, "create_app", record)
    result = CliRunner().invoke(app, ["coordinator", *args])
    assert isinstance(result.exception, _Built), result.output
    return result.exception.settings


def _node_settings(monkeypatch: pytest.MonkeyPatch, *args: str) -> NodeSettings:
    async def record(settings: NodeSettings, cheat: str | None = None) -> None:
        raise _Built(settings)

    monkeypatch.setattr(serve_cli, "_run_node", record)
    result = CliRunner().invoke(app, ["node", *args])
    assert isinstance(result.exception, _Built), result.output
    return result.exception.settings


def test_coordinator_flags_beat_environment_beat_file_beat_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_config_env: None
) -> None:
    config = tmp_path / "sparecycles.toml"
    config.write_text('[coordinator]\nport = 9002\nhost = "10.0.0.2"\nlog_level = "warning"\n'
                      'bus = "nats://file:4222"\n')
    monkeypatch.setenv("SPARECYCLES_PORT", "9001")
    monkeypatch.setenv("SPARECYCLES_LOG_LEVEL", "error")
    s = _coordinator_settings(monkeypatch, "--config", str(config), "--host", "10.0.0.3")
    assert s.host == "10.0.0.3"  # flag over file
    assert s.port == 9001  # environment over file
    assert s.log_level == "error"  # environment over file (no flag given)
    assert s.bus == "nats://file:4222"  # file over default
    assert s.currency == "USD"  # default
    s = _coordinator_settings(monkeypatch, "--config", str(config), "--port", "9003")
    assert s.port == 9003  # flag over environment


def test_the_config_file_may_be_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_config_env: None
) -> None:
    config = tmp_path / "sparecycles.toml"
    config.write_text("[coordinator]\nport = 9002\n[node]\njobs_max = 3\n")
    monkeypatch.setenv("SPARECYCLES_CONFIG", str(config))
    assert _coordinator_settings(monkeypatch).port == 9002
    assert _node_settings(monkeypatch).jobs_max == 3
    assert CoordinatorSettings.from_sources().port == 9002
    # a file without the role's table configures nothing for that role
    config.write_text("[node]\njobs_max = 3\n")
    assert CoordinatorSettings.from_sources().port == 8000


def test_node_flags_beat_environment_beat_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_config_env: None
) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\njobs_max = 5\nname = "from-file"\nduty_cycle = 0.5\n')
    monkeypatch.setenv("SPARECYCLES_NODE_JOBS_MAX", "6")
    monkeypatch.setenv("SPARECYCLES_NODE_NAME", "from-env")
    s = _node_settings(monkeypatch, "--config", str(config), "--name", "from-flag")
    assert s.name == "from-flag" and s.jobs_max == 6 and s.duty_cycle == 0.5
    assert s.stream_interval_ms == 10.0


def test_node_time_zone_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_config_env: None
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[availability]\nwindows = [[1320, 420]]\n")
    s = _node_settings(monkeypatch, "--availability", str(policy), "--time-zone", "Europe/Berlin")
    assert s.availability == {"windows": [[1320, 420]], "time_zone": "Europe/Berlin"}
    result = CliRunner().invoke(app, ["node", "--time-zone", "Europe/Atlantis"])
    assert result.exit_code == 1 and "unknown time zone" in result.output


def test_chains_when_faster_is_on_with_a_margin_of_at_least_one(monkeypatch) -> None:
    from pydantic import ValidationError

    s = CoordinatorSettings()
    assert s.chains_when_faster and s.chain_speedup_min == 1.2
    monkeypatch.setenv("SPARECYCLES_CHAINS_WHEN_FASTER", "0")
    monkeypatch.setenv("SPARECYCLES_CHAIN_SPEEDUP_MIN", "1.5")
    s = CoordinatorSettings()
    assert not s.chains_when_faster and s.chain_speedup_min == 1.5
    with pytest.raises(ValidationError):  # a chain slower than the whole node: refused
        CoordinatorSettings(chain_speedup_min=0.9)
