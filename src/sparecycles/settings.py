"""One settings object per role, from flags, environment (``SPARECYCLES_*``) and a TOML file.

Precedence, highest first: command-line flags, environment variables, the TOML file named by
``--config`` or ``SPARECYCLES_CONFIG``, then the defaults below. Every field is documented here
and in ``docs/configuration.md``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sparecycles import limits


def default_data_dir() -> Path:
    return Path(os.environ.get("SPARECYCLES_DATA_DIR", ".sparecycles"))


def default_database_url() -> str:
    return os.environ.get("SPARECYCLES_DATABASE") or f"sqlite:///{default_data_dir()}/sparecycles.db"


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARECYCLES_", extra="ignore")

    database: str = Field(default_factory=default_database_url)
    """SQLAlchemy URL: ``sqlite:///path`` (default, embedded) or ``postgresql://…``."""
    bus: str = "memory"
    """Messages between replicas: ``memory`` (one process) or ``nats://host:4222``."""
    host: str = "127.0.0.1"
    port: int = 8000
    replica_id: str = ""
    """Name of this replica in logs and job records; defaults to host:port. Keep it stable
    across restarts: a replica restarted under its name settles its own open jobs at once."""
    replica_lease_s: float = 15.0
    """A replica whose lease is not renewed for this long (and that is silent on the bus) is
    dead: another replica settles its open jobs (coordinator/replication/leases.py)."""
    models: list[str] = Field(default_factory=list)
    """Models the network serves, as ``NAME=SOURCE`` (a local directory or a hub id)."""
    currency: str = "USD"
    placement_wait_s: float = limits.placement_wait_s_max
    """How long a job may wait for a node before it is answered 503."""
    heartbeat_timeout_s: float = limits.heartbeat_timeout_s
    token_gap_s: float = limits.token_gap_s_max
    """A node silent this long on a job it holds is treated as gone and the job resumed."""
    request_body_bytes_max: int = limits.request_body_bytes_max
    scheduler_policy: str = "fastest"
    verification: bool = True
    """Spot-check nodes' work after settlement (teacher-forced scoring, re-execution), keep each
    node's reputation and withhold the earnings of work that fails (docs/security.md)."""
    log_level: str = "info"


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARECYCLES_NODE_", extra="ignore")

    coordinator: str = "http://127.0.0.1:8000"
    token: str = ""
    name: str = ""
    models: list[str] = Field(default_factory=list)
    """Models the owner allows, as ``NAME=SOURCE``."""
    config_dir: Path = Field(
        default_factory=lambda: Path(
            os.environ.get("XDG_CONFIG_HOME", str(Path.home() / ".config"))
        )
        / "sparecycles"
    )
    """Where the node's Ed25519 key and device profile are kept (mode 0600)."""
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda:N``."""
    backend: str = "auto"
    """``auto`` (llamacpp for a GGUF file, else transformers), ``transformers``, ``llamacpp``."""
    threads: int = 0
    """Threads the llamacpp backend computes on (0: every core)."""
    device_class: str = ""
    jobs_max: int = 8
    stream_interval_ms: float = Field(default=10.0, ge=0.0, le=1_000.0)
    """After the first token, tokens go to the coordinator at most this often (merged into one
    message): a fast device otherwise spends its CPU on one message per token. 0: each alone."""
    duty_cycle: float = 1.0
    """Share of time (0-1] the device may compute for the network; it rests the remainder."""
    availability: dict[str, Any] = Field(default_factory=dict)
    """AvailabilityPolicy fields, e.g. windows = [[1320, 420]] for 22:00-07:00."""
    reprofile: bool = False
    electricity_price: str = ""
    """The owner's tariff per kWh, e.g. ``0.30`` (for "net profit after electricity")."""
    hardware_price: str = ""
    """What the device cost the owner, e.g. ``1500.00`` (for its wear per busy hour)."""
    hardware_life_h: float = 0.0
    """Busy hours the owner expects the device to last (0: the device class's default)."""


def load_toml(path: Path | None) -> dict[str, Any]:
    """The ``[coordinator]`` / ``[node]`` tables of a TOML config file, or {} without one."""
    path = path or (Path(p) if (p := os.environ.get("SPARECYCLES_CONFIG")) else None)
    if path is None:
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def parse_model_args(entries: list[str]) -> dict[str, str]:
    """``["tiny=/models/tiny"]`` -> ``{"tiny": "/models/tiny"}``; a bare source names itself."""
    out: dict[str, str] = {}
    for entry in entries:
        name, sep, source = entry.partition("=")
        if not sep:
            name, source = Path(entry).name or entry, entry
        if not name or not source:
            raise ValueError(f"model must be NAME=SOURCE, got {entry!r}")
        out[name] = source
    return out
