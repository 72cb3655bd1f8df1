"""One settings object per role, from flags, environment (``SPARECYCLES_*``) and a TOML file.

Precedence, highest first: command-line flags, environment variables, the TOML file named by
``--config`` or ``SPARECYCLES_CONFIG`` (its ``[coordinator]`` or ``[node]`` table), then the
defaults below. ``from_sources`` builds a settings object in that order with pydantic-settings'
own sources (init arguments for the flags, the environment, ``TomlConfigSettingsSource``), so the
order is pydantic-settings' and not a merge of dicts. Every field is documented here and in
README.md's "Configuration".
"""

from __future__ import annotations

import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sparecycles import limits


def default_data_dir() -> Path:
    return Path(os.environ.get("SPARECYCLES_DATA_DIR", ".sparecycles"))


def default_database_url() -> str:
    return os.environ.get("SPARECYCLES_DATABASE") or f"sqlite:///{default_data_dir()}/sparecycles.db"


config_env = "SPARECYCLES_CONFIG"


def config_path(path: Path | None = None) -> Path | None:
    """The TOML file to read: ``path`` (the ``--config`` flag), else ``SPARECYCLES_CONFIG``."""
    if path is not None:
        return path
    named = os.environ.get(config_env)
    return Path(named) if named else None


class _RoleSettings(BaseSettings):
    """Settings of one role, read from flags > environment > the role's TOML table > defaults."""

    toml_table: ClassVar[str]

    @classmethod
    def from_sources(cls, config: Path | None = None, **flags: Any) -> Self:
        """The settings from ``flags`` (only those given: leave out a flag that was not set),
        the environment, the ``[toml_table]`` table of ``config`` (or of ``SPARECYCLES_CONFIG``)
        and the defaults, highest first."""
        token = _toml_file.set(config_path(config))
        try:
            return cls(**flags)
        finally:
            _toml_file.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_file.get()
        if path is not None:
            with open(path, "rb") as f:  # a missing file is an error, not an empty config
                has_table = cls.toml_table in tomllib.load(f)
            if has_table:  # a file may configure only the other role
                sources.append(TomlConfigSettingsSource(
                    settings_cls, toml_file=path, toml_table_header=(cls.toml_table,)))
        return tuple(sources)


# The TOML file of the settings being built by ``from_sources`` (a plain constructor call reads
# none: flags, environment and defaults only).
_toml_file: ContextVar[Path | None] = ContextVar("sparecycles_toml_file", default=None)


class CoordinatorSettings(_RoleSettings):
    model_config = SettingsConfigDict(env_prefix="SPARECYCLES_", extra="ignore")
    toml_table: ClassVar[str] = "coordinator"

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
    """A node silent this long on a job it holds is treated as gone and the job resumed; before
    the job's first token, this plus its prefill at a pessimistic rate
    (``coordinator.dispatch.first_token_grace_s``)."""
    request_body_bytes_max: int = limits.request_body_bytes_max
    scheduler_policy: str = "fastest"
    prefix_aware: bool = True
    """Offer a conversation's next turn to the node whose prefix cache holds its history (that
    node prefills only the new message), weighed by the scheduler against its load."""
    chains_when_faster: bool = True
    """Serve a job by a chain of stages (nodes each holding some of the model's layers) also
    when whole-model nodes could serve it, if the chain is predicted to decode at least
    ``chain_speedup_min`` times as fast as the best of them (docs/scheduling.md, "Chains").
    Off: chains serve only models that no connected node holds whole."""
    chain_speedup_min: float = Field(default=limits.chain_speedup_min_default, ge=1.0, le=100.0)
    """The margin ``chains_when_faster`` asks of a chain: its predicted tokens per second over
    the best whole-model node's (1.2: 20 % faster), for the hops and departures it risks."""
    disagg: Literal["off", "auto", "always"] = "off"
    """Disaggregated prefill/decode (coordinator/handoff.py): ``auto`` prefills a job on one node
    and decodes it on another, its KV cache sent through the coordinator, when the scheduler's
    roofline predicts the pair beats any single node (it needs nodes' link speeds); ``always``
    whenever another node can take it (tests, demos, benchmarks); ``off``: never."""
    verification: bool = True
    """Spot-check nodes' work after settlement (teacher-forced scoring, re-execution), keep each
    node's reputation and withhold the earnings of work that fails (docs/security.md)."""
    log_level: str = "info"


class NodeSettings(_RoleSettings):
    model_config = SettingsConfigDict(env_prefix="SPARECYCLES_NODE_", extra="ignore")
    toml_table: ClassVar[str] = "node"

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
    prefix_cache: bool = True
    """The llamacpp backend keeps its last requests' KV cells for prompts that start the same
    way (a conversation's next turn prefills only its new message)."""
    device_class: str = ""
    jobs_max: int = 8
    stream_interval_ms: float = Field(default=10.0, ge=0.0, le=1_000.0)
    """After the first token, tokens go to the coordinator at most this often (merged into one
    message): a fast device otherwise spends its CPU on one message per token. 0: each alone."""
    duty_cycle: float = 1.0
    """Share of time (0-1] the device may compute for the network; it rests the remainder."""
    layers: str = ""
    """``FIRST:END``: serve only layers [FIRST, END) of each model, as one stage of a chain."""
    memory_max: str = ""
    """The most memory the network's weights may take on this device, e.g. ``6GB``."""
    availability: dict[str, Any] = Field(default_factory=dict)
    """AvailabilityPolicy fields, e.g. windows = [[1320, 420]] for 22:00-07:00."""
    reprofile: bool = False
    profile_llamacpp: bool = False
    """Time llama.cpp's own kernels for the performance model (node/llamacpp_profile.py) where
    this node serves GGUFs on llama.cpp: about a minute and 1 GB of temporary disk at the first
    start, then cached with the profile. Off: the model predicts from the copy bandwidth."""
    electricity_price: str = ""
    """The owner's tariff per kWh, e.g. ``0.30`` (for "net profit after electricity")."""
    hardware_price: str = ""
    """What the device cost the owner, e.g. ``1500.00`` (for its wear per busy hour)."""
    hardware_life_h: float = 0.0
    """Busy hours the owner expects the device to last (0: the device class's default)."""


_size_units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"6GB"`` -> 6_000_000_000 bytes; ``GiB`` and friends are powers of two."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _size_units:
        raise ValueError(f"not a size: {text!r} (e.g. 6GB, 512MiB)")
    return int(float(m.group(1)) * _size_units[unit])


def parse_layers(text: str) -> tuple[int, int | None]:
    """``"0:12"`` -> (0, 12); ``"12:"`` -> (12, None), to the last layer."""
    first, sep, end = text.partition(":")
    if not sep or not first.strip().isdigit() or not (end.strip().isdigit() or not end.strip()):
        raise ValueError(f"--layers takes FIRST:END, e.g. 0:12, got {text!r}")
    return int(first), int(end) if end.strip() else None


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
