"""What a load test needs in the database before it starts: a node token, client keys, money.

Everything is made under names starting ``loadtest`` so that it is easy to tell apart from real
owners and clients. Run it once against the database the coordinator(s) use.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparecycles.ledger.pricing import ModelPrice, PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.store import Store

deposit_micros_default = 10**12  # a million units of the currency: no run spends it
keys_max = 10_000


@dataclass(frozen=True, slots=True)
class LoadtestCredentials:
    node_token: str
    keys: tuple[str, ...]


def prepare(database: str, *, keys: int, owner: str = "loadtest-owner",
            client: str = "loadtest-client", model: str | None = None,
            deposit_micros: int = deposit_micros_default) -> LoadtestCredentials:
    """Migrate the database, make one node token for ``owner`` and ``keys`` API keys for
    ``client``, deposit ``deposit_micros`` (once per ``client``; a rerun tops it up only with the
    same reference, i.e. not at all), and give ``model`` a small fixed price so every token is
    visible in the ledger."""
    if not 1 <= keys <= keys_max:
        raise ValueError(f"keys must be 1-{keys_max}")
    store = Store(database)
    store.migrate()
    try:
        token = store.create_node_token(owner, "loadtest")
        secrets = tuple(store.create_api_key(client, f"loadtest-{i}")[1] for i in range(keys))
        ledger = Ledger(store.sessions, prices=PriceBook.default())
        client_id = store.ensure_client(client)
        ledger.deposit(client_id, deposit_micros, reference=f"loadtest-topup-{client_id}")
        if model:
            ledger.set_price(model, ModelPrice(1_000_000, 2_000_000))
    finally:
        store.close()
    return LoadtestCredentials(token, secrets)
