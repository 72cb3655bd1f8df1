"""The two long-running roles: ``sparecycles coordinator`` and ``sparecycles node``."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import tomllib
from pathlib import Path
from typing import Any

import typer

from sparecycles import limits
from sparecycles.availability import check_time_zone
from sparecycles.cli.common import console, friendly, setup_logging
from sparecycles.settings import (
    CoordinatorSettings,
    NodeSettings,
    parse_layers,
    parse_model_args,
    parse_size,
)

# Help texts are rich markup: a literal "[word]" is written "\[word]" or rich takes it for a style
# and prints nothing ("[127.0.0.1]" and "[8000]" are no style names and print as they are).


def coordinator(
    host: str = typer.Option(None, help="Address to listen on [127.0.0.1]"),
    port: int = typer.Option(None, help="Port [8000]"),
    database: str = typer.Option(None, help="sqlite:///path (default) or postgresql://…"),
    bus: str = typer.Option(
        None, help="memory (default, one replica) or nats://host:4222 (several replicas)"),
    model: list[str] = typer.Option(None, "--model", help="NAME=SOURCE, repeatable"),
    config: Path = typer.Option(None, "--config", help=r"TOML file with a \[coordinator] table"),
    placement_wait_s: float = typer.Option(None, help="Seconds a job may wait for a node"),
    replica_id: str = typer.Option(None, help="Name of this replica"),
    log_level: str = typer.Option(None, help=r"debug, info, warning or error \[info]"),
) -> None:
    """Run the coordinator: the OpenAI-compatible API and the node protocol."""
    import uvicorn

    from sparecycles.api.app import create_app

    flags = {k: v for k, v in {
        "host": host, "port": port, "database": database, "bus": bus, "models": model or None,
        "placement_wait_s": placement_wait_s, "replica_id": replica_id, "log_level": log_level,
    }.items() if v is not None}
    settings = CoordinatorSettings.from_sources(config, **flags)
    setup_logging(settings.log_level)
    app = create_app(settings)
    tune_gc()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=limits.ws_message_bytes_max,
        # node frames are small JSON; deflate cost 44% of a replica's CPU at 10,000 nodes and
        # a third of its memory (docs/benchmarks.md, "Control plane")
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=5,
        # above info the access lines are dropped anyway: without the logger, uvicorn does not
        # format each request's client address and path for it
        access_log=settings.log_level.lower() in ("debug", "info"),
    )


def tune_gc() -> None:
    """A long-running server's garbage collector: what was loaded at start-up (the libraries,
    ~130,000 objects) is moved out of the collector's sight (``gc.freeze``), and the youngest
    generation is collected every 20,000 net allocations instead of 700. Placement allocates a few
    objects per node per request, and each collection walked the young objects of a busy
    coordinator: 131 -> 146 requests/s on one replica (docs/benchmarks.md, control plane).
    The objects are mostly freed by reference counting; only cycles wait longer."""
    gc.freeze()
    gc.set_threshold(gc_thresholds[0], gc_thresholds[1], gc_thresholds[2])


gc_thresholds = (20_000, 20, 20)


def node(
    coordinator_url: str = typer.Option(
        None, "--coordinator",
        help="Coordinator URL; several replicas' URLs separated by commas are tried in turn"),
    token: str = typer.Option(None, "--token", help="The owner's node token"),
    model: list[str] = typer.Option(None, "--model", help="NAME=SOURCE the owner allows"),
    name: str = typer.Option(None, help="A name for this device"),
    device: str = typer.Option(None, help="auto, cpu or cuda:N"),
    backend: str = typer.Option(
        None, help="auto (llamacpp for a .gguf, else transformers), transformers or llamacpp"),
    threads: int = typer.Option(None, help="Threads for the llamacpp backend (default: all)"),
    prefix_cache: bool = typer.Option(
        None, "--prefix-cache/--no-prefix-cache",
        help="llamacpp: keep recent requests' KV cells for prompts that start the same way"),
    device_class: str = typer.Option(None, help="gaming-pc, laptop, car, server, …"),
    jobs_max: int = typer.Option(None, help="Jobs this node runs at once"),
    stream_interval_ms: float = typer.Option(
        None, help="Send tokens at most this often after the first (default 10; 0: each alone)"),
    duty_cycle: float = typer.Option(None, help="Share of time (0-1] to compute for the network"),
    layers: str = typer.Option(
        None, help="FIRST:END: hold only these layers of each model (a stage of a chain)"),
    memory_max: str = typer.Option(
        None, help="Most memory the network's weights may take here, e.g. 6GB"),
    config_dir: Path = typer.Option(None, help="Where the node key and profile are kept"),
    availability: Path = typer.Option(
        None, help=r"TOML file with an \[availability] table (the owner's policy)"),
    time_zone: str = typer.Option(
        None, help="IANA time zone of the availability windows, e.g. Europe/Berlin"),
    config: Path = typer.Option(None, "--config", help=r"TOML file with a \[node] table"),
    reprofile: bool = typer.Option(False, help="Measure the device again"),
    electricity_price: str = typer.Option(None, help="Your tariff per kWh, e.g. 0.30"),
    hardware_price: str = typer.Option(None, help="What the device cost you, e.g. 1500.00"),
    hardware_life_h: float = typer.Option(None, help="Busy hours you expect it to last"),
    log_level: str = typer.Option("info"),
    cheat: str = typer.Option(None, "--cheat", hidden=True,
                              help="tests only (needs SPARECYCLES_ALLOW_CHEATS=1)"),
) -> None:
    """Run a node agent: profile the device, load the models, serve jobs."""
    flags = {k: v for k, v in {
        "coordinator": coordinator_url, "token": token, "models": model or None, "name": name,
        "device": device, "backend": backend, "threads": threads,
        "prefix_cache": prefix_cache,
        "device_class": device_class, "jobs_max": jobs_max,
        "stream_interval_ms": stream_interval_ms,
        "duty_cycle": duty_cycle, "layers": layers, "memory_max": memory_max,
        "config_dir": config_dir, "reprofile": reprofile or None,
        "electricity_price": electricity_price, "hardware_price": hardware_price,
        "hardware_life_h": hardware_life_h,
    }.items() if v is not None}
    if availability is not None:  # a file named by a flag: as strong as a flag
        with open(availability, "rb") as f:
            flags["availability"] = tomllib.load(f).get("availability", {})
    settings = NodeSettings.from_sources(config, **flags)
    if time_zone is not None:
        settings.availability = {**settings.availability, "time_zone": time_zone}
    setup_logging(log_level)
    with _errors():
        if zone := settings.availability.get("time_zone"):  # before minutes of profiling
            check_time_zone(str(zone))
        asyncio.run(_run_node(settings, cheat))


def _errors() -> Any:
    from sparecycles.cli.common import one_line_errors

    return one_line_errors()


def _uses_torch(models: dict[str, str], backend: str) -> bool:
    """Whether this node serves a model on the transformers backend (PyTorch)."""
    from sparecycles.node.backends import Backend, choose_backend

    return any(choose_backend(source, backend) is Backend.TRANSFORMERS
               for source in models.values())


def _llamacpp_types(models: dict[str, str], backend: str) -> tuple[str, ...] | None:
    """The tensor types of the GGUF files this node serves with llama.cpp, which its profile
    measures llama.cpp's speed for (node/llamacpp_profile.py); None when it serves none."""
    from sparecycles import modelfiles
    from sparecycles.node import llamacpp_profile
    from sparecycles.node.backends import Backend, choose_backend

    files = [modelfiles.gguf_source(source) for source in models.values()
             if choose_backend(source, backend) is Backend.LLAMACPP]
    paths = [p for p in files if p is not None]
    return llamacpp_profile.gguf_types(paths) if paths else None


async def _run_node(settings: NodeSettings, cheat: str | None = None) -> None:
    from sparecycles.coordinator.node_conn import policy_from_dict
    from sparecycles.identity import NodeIdentity
    from sparecycles.node.agent import NodeAgent
    from sparecycles.node.backends import load_engine
    from sparecycles.node.backends.base import Engine, openmp_crowded
    from sparecycles.node.profile import profile_device
    from sparecycles.node.status import StatusProbe

    if not settings.token:
        raise ValueError("a node needs --token (ask the coordinator's admin: owners token)")
    if cheat is not None and os.environ.get("SPARECYCLES_ALLOW_CHEATS") != "1":
        raise ValueError("--cheat is for tests only (SPARECYCLES_ALLOW_CHEATS=1)")
    models = parse_model_args(settings.models)
    if not models:
        raise ValueError("a node needs at least one --model NAME=SOURCE")
    identity = NodeIdentity.load_or_create(settings.config_dir / "node_key.pem")
    profile = await asyncio.to_thread(
        profile_device,
        cache_path=settings.config_dir / "profile.json",
        refresh=settings.reprofile,
        device_class=settings.device_class or None,
        llamacpp_types=(_llamacpp_types(models, settings.backend)
                        if settings.profile_llamacpp else None),
        uses_torch=_uses_torch(models, settings.backend),
    )
    console.print(f"node {identity.node_id}: {profile.device_class}, "
                  f"{profile.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s measured")
    engines: dict[str, Engine] = {}
    stages = await _load_stages(settings, models)
    for model_name, source in models.items() if stages is None else ():
        if settings.memory_max:
            _check_memory_max(model_name, source, parse_size(settings.memory_max))
        engines[model_name] = await asyncio.to_thread(
            load_engine, model_name, source, settings.backend, device=settings.device,
            duty_cycle=settings.duty_cycle, threads=settings.threads or None,
            prefix_cache=settings.prefix_cache,
        )
    if openmp_crowded(engines.values()):
        console.print(f"[yellow]warning:[/] {len(engines)} models share this node's process, "
                      "llama.cpp on OpenMP among them: libgomp then has more threads than cores "
                      "and llama.cpp decodes 2-3x slower (docs/benchmarks.md, \"OpenMP\"); "
                      "serve one model per node for its full speed")
    agent = NodeAgent(
        coordinator_url=settings.coordinator,
        token=settings.token,
        identity=identity,
        profile=profile,
        engines=engines,
        policy=policy_from_dict(settings.availability),
        name=settings.name or identity.node_id,
        jobs_max=settings.jobs_max,
        stream_interval_s=settings.stream_interval_ms / 1000,
        owner_costs=_owner_costs(settings),
    )
    agent.status_probe = StatusProbe()
    agent.stages = stages
    if cheat is not None:
        from sparecycles.node import cheats  # test-only behaviours; see node/cheats.py

        cheats.apply(agent, cheat, device=settings.device, duty_cycle=settings.duty_cycle,
                     threads=settings.threads or None)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    loop.add_signal_handler(signal.SIGUSR1, agent.pause)
    loop.add_signal_handler(signal.SIGUSR2, agent.resume)
    pid_file = settings.config_dir / "node.pid"
    pid_file.write_text(str(os.getpid()))
    try:
        await agent.run()
    finally:
        pid_file.unlink(missing_ok=True)
        for engine in engines.values():
            engine.close()
        if stages is not None:
            stages.close()


async def _load_stages(settings: NodeSettings, models: dict[str, str]) -> Any:
    """With ``--layers``: a StageWorker holding that range of each model, else None."""
    if not settings.layers:
        return None
    from sparecycles.node.backends.transformers_stage import StageEngine
    from sparecycles.node.stage_worker import StageWorker

    first, end = parse_layers(settings.layers)
    cap = parse_size(settings.memory_max) if settings.memory_max else None
    stages = {}
    for model_name, source in models.items():
        stages[model_name] = await asyncio.to_thread(
            StageEngine.load, model_name, source, first=first, end=end, device=settings.device,
            memory_max_bytes=cap, duty_cycle=settings.duty_cycle)
        s = stages[model_name]
        console.print(f"{model_name}: layers {s.first}:{s.end} of {s.spec.n_layers} "
                      f"({s.weight_bytes / 1e9:.2f} GB)")
    return StageWorker(stages)


def _check_memory_max(name: str, source: str, cap_bytes: int) -> None:
    """Refuse a whole model whose weights exceed the owner's cap, naming a range that fits."""
    from sparecycles import modelfiles

    spec = modelfiles.model_spec(name, source, hash_weights=False)
    if spec.weight_bytes <= cap_bytes:
        return
    per_layer = spec.weight_bytes / max(1, spec.n_layers)
    fit = max(0, int(cap_bytes // per_layer) - 1)
    raise ValueError(f"{name} takes {spec.weight_bytes / 1e9:.2f} GB, over --memory-max "
                     f"{cap_bytes / 1e9:.2f} GB; serve part of it, e.g. --layers 0:{fit}"
                     if fit else f"{name} does not fit in --memory-max")


def _signal_node(config_dir: Path | None, sig: signal.Signals) -> int:
    folder = config_dir or NodeSettings().config_dir
    try:
        pid = int((folder / "node.pid").read_text())
        os.kill(pid, sig)
    except (OSError, ValueError):
        raise ValueError(f"no node agent is running with config dir {folder}") from None
    return pid


def pause(config_dir: Path = typer.Option(None, help="The node's config dir")) -> None:
    """Take the device back now: the node finishes what it can within its drain grace, hands
    the rest to other nodes, and takes no work until `sparecycles resume`."""
    pid = _signal_node(config_dir, signal.SIGUSR1)
    console.print(f"node agent {pid} is draining and will take no new work")


def resume(config_dir: Path = typer.Option(None, help="The node's config dir")) -> None:
    """Let the node take work again (within its availability policy)."""
    pid = _signal_node(config_dir, signal.SIGUSR2)
    console.print(f"node agent {pid} takes work again")


def _owner_costs(settings: NodeSettings) -> dict[str, Any]:
    """The owner's own costs, sent with the device profile so the owner sees net profit."""
    from sparecycles.ledger.pricing import parse_money

    out: dict[str, Any] = {}
    if settings.electricity_price:
        out["electricity_price_micros_per_kwh"] = parse_money(settings.electricity_price)
    if settings.hardware_price:
        out["hardware_price_micros"] = parse_money(settings.hardware_price)
    if settings.hardware_life_h > 0:
        out["hardware_life_h"] = settings.hardware_life_h
    return out


def register(app: typer.Typer) -> None:
    app.command("coordinator")(friendly(coordinator))
    app.command("node")(node)
    app.command("pause")(friendly(pause))
    app.command("resume")(friendly(resume))
