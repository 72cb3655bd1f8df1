"""Keys for clients and tokens for owners' nodes."""

from __future__ import annotations

import typer
from rich.table import Table

from sparecycles.cli.common import DatabaseOption, console, database_url, friendly
from sparecycles.store import Store

keys_app = typer.Typer(help="Client API keys (stored hashed; shown once).", no_args_is_help=True)
owners_app = typer.Typer(help="Device owners and their node tokens.", no_args_is_help=True)

_scopes = ("inference", "admin", "owner", "workload:training", "workload:rnd")


def _store(database: str | None) -> Store:
    store = Store(database_url(database))
    store.migrate()
    return store


@keys_app.command("create")
@friendly
def keys_create(
    name: str = typer.Option(..., "--name", help="A name for the key, e.g. the app using it"),
    client: str = typer.Option("", "--client", help="Client (account) name; default: --name"),
    scope: list[str] = typer.Option(
        ["inference"], "--scope",
        help="inference, admin, owner, or workload:training / workload:rnd for the platform's "
             "own internal accounts (not charged; their cost is opex)"),
    database: str | None = DatabaseOption,
) -> None:
    """Make an API key and print it once."""
    bad = [s for s in scope if s not in _scopes]
    if bad:
        raise ValueError(f"unknown scope {bad[0]!r}; choose from {', '.join(_scopes)}")
    key_id, secret = _store(database).create_api_key(client or name, name, tuple(scope))
    console.print(f"key id {key_id} for client '{client or name}' (shown once, keep it safe):")
    print(secret)


@keys_app.command("list")
@friendly
def keys_list(database: str | None = DatabaseOption) -> None:
    table = Table("id", "client", "name", "prefix", "scopes", "revoked")
    for k in _store(database).list_api_keys():
        table.add_row(k["id"], k["client"], k["name"], k["prefix"] + "…", k["scopes"],
                      "yes" if k["revoked"] else "")
    console.print(table)


@keys_app.command("revoke")
@friendly
def keys_revoke(key_id: str, database: str | None = DatabaseOption) -> None:
    _store(database).revoke_api_key(key_id)
    console.print(f"revoked {key_id}")


@owners_app.command("token")
@friendly
def owners_token(
    owner: str = typer.Option(..., "--owner", help="Owner name (created if new)"),
    name: str = typer.Option("default", "--name", help="A name for the token"),
    database: str | None = DatabaseOption,
) -> None:
    """Make a node token for an owner's devices (``sparecycles node --token``), shown once."""
    secret = _store(database).create_node_token(owner, name)
    console.print(f"node token for owner '{owner}' (shown once):")
    print(secret)


@owners_app.command("key")
@friendly
def owners_key(
    owner: str = typer.Option(..., "--owner", help="Owner name (created if new)"),
    name: str = typer.Option("dashboard", "--name", help="A name for the key"),
    database: str | None = DatabaseOption,
) -> None:
    """Make an owner's key to sign in to the dashboard (/dashboard), shown once."""
    key_id, secret = _store(database).create_owner_key(owner, name)
    console.print(f"owner key {key_id} for owner '{owner}' (shown once, keep it safe):")
    print(secret)


@owners_app.command("trust")
@friendly
def owners_trust(
    owner: str = typer.Option(..., "--owner", help="Owner name (created if new)"),
    revoke: bool = typer.Option(False, "--revoke", help="Stop trusting this owner"),
    database: str | None = DatabaseOption,
) -> None:
    """Designate an owner's nodes as trusted (the operator's own machines): they verify others'
    work, take trusted-only jobs and are not spot-checked. A running coordinator picks this up at
    its next start; PUT /v1/admin/owners/{owner}/trusted applies at once."""
    from sparecycles.store.trust_queries import TrustQueries

    store = _store(database)
    store.ensure_owner(owner)
    TrustQueries(store.sessions).set_owner_trusted(owner, not revoke)
    console.print(f"owner '{owner}' is {'no longer ' if revoke else ''}trusted")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.add_typer(owners_app, name="owners")
