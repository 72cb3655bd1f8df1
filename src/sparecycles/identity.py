"""Ed25519 identities: a node's key pair, its id, and signing and checking of results.

A node makes its key pair on first start and keeps the private key in the owner's config
directory, readable only by the owner (mode 0600). The node id is derived from the public key,
so a node cannot claim another's id without its private key.

Keys and signatures are made with ``cryptography``; the coordinator checks them with libsodium
(PyNaCl), whose Ed25519 verification takes half the CPU of OpenSSL's here (56 against 105 us a
result, one a request on the coordinator's event loop: docs/benchmarks.md, issue 19). libsodium
is the stricter of the two (it refuses small-order keys and non-canonical encodings), which
honest nodes never make.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.signing import VerifyKey

from sparecycles.protocol import b64, unb64


def node_id_for(public_key_b64: str) -> str:
    """A short stable id for a public key: ``node_`` and 16 hex digits of its SHA-256."""
    return "node_" + hashlib.sha256(unb64(public_key_b64)).hexdigest()[:16]


class NodeIdentity:
    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key_b64 = b64(raw)
        self.node_id = node_id_for(self.public_key_b64)

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> NodeIdentity:
        """Load the key at ``path``, or make one there readable only by its owner."""
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls(key)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = identity._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return identity

    def sign(self, payload: bytes) -> str:
        return b64(self._key.sign(payload))


def verify(public_key_b64: str, payload: bytes, signature_b64: str) -> bool:
    """True only for a valid signature of ``payload`` by that key; never raises on bad input."""
    try:
        VerifyKey(unb64(public_key_b64)).verify(payload, unb64(signature_b64))
    except Exception:  # BadSignatureError, a key or signature of the wrong size, bad base64
        return False
    return True
