"""API keys: one admin key created on first start, stored hashed; the plaintext goes to a 0600 file."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from corral.daemon.store import Store
from corral.errors import AuthenticationError


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, store: Store):
        self.store = store
        self._keys = {k["key_hash"]: Principal(k["id"], k["role"]) for k in store.api_keys()}

    def ensure_local_key(self, path: Path) -> str | None:
        """Create the admin key on first start (or when its file was lost). Returns a new key or None."""
        if path.exists() and self._keys:
            return None
        key = "ck_" + secrets.token_urlsafe(32)
        key_id = "key-" + secrets.token_hex(4)
        self.store.add_api_key(key_id, "local-admin", hash_key(key), "admin")
        self._keys[hash_key(key)] = Principal(key_id, "admin")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return key

    def authenticate(self, header: str | None) -> Principal:
        if not header:
            raise AuthenticationError("this request carries no API key")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("the Authorization header must be 'Bearer <key>'")
        digest = hash_key(token.strip())
        for known, principal in self._keys.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise AuthenticationError("the API key is not valid")
