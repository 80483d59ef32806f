"""API keys (corral.daemon.auth.KeyRing): the local admin key, stored hashed, and Bearer authentication."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import errors
from corral.daemon.auth import KeyRing, Principal, hash_key
from corral.daemon.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "corral.db")
    yield s
    s.close()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "data" / "api-key"


@pytest.fixture
def umask0() -> Iterator[None]:
    """The key file must be 0600 whatever the daemon's umask is."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_first_start_creates_a_0600_key_file(store: Store, key_file: Path, umask0: None) -> None:
    key = KeyRing(store).ensure_local_key(key_file)
    assert key is not None and key.startswith("ck_") and len(key) > 40
    assert key_file.read_text() == key + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not key_file.with_name("api-key.tmp").exists()


def test_the_store_holds_the_hash_not_the_key(tmp_path: Path, store: Store, key_file: Path) -> None:
    key = KeyRing(store).ensure_local_key(key_file)
    assert key is not None
    (row,) = store.api_keys()
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest() == hash_key(key)
    assert row["role"] == "admin" and row["id"].startswith("key-")
    assert key not in repr(store.api_keys())
    store.close()
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("corral.db*"))  # the database, its WAL and SHM
    assert key.encode() not in on_disk
    assert row["key_hash"].encode() in on_disk


def test_existing_key_file_is_kept(store: Store, key_file: Path) -> None:
    key = KeyRing(store).ensure_local_key(key_file)
    assert KeyRing(store).ensure_local_key(key_file) is None  # a restart makes no new key
    assert key_file.read_text() == f"{key}\n"
    assert len(store.api_keys()) == 1


def test_a_lost_key_file_is_replaced(store: Store, key_file: Path) -> None:
    ring = KeyRing(store)
    old = ring.ensure_local_key(key_file)
    key_file.unlink()
    new = ring.ensure_local_key(key_file)
    assert new is not None and new != old
    assert key_file.read_text() == new + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    ring.authenticate(f"Bearer {new}")


def test_a_stale_tmp_file_does_not_leak_its_mode(store: Store, key_file: Path) -> None:
    key_file.parent.mkdir(parents=True)
    tmp = key_file.with_name("api-key.tmp")
    tmp.write_text("leftover from a crash, much longer than any key " * 4)
    tmp.chmod(0o644)
    key = KeyRing(store).ensure_local_key(key_file)
    assert key_file.read_text() == f"{key}\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_keys_survive_a_restart(tmp_path: Path, store: Store, key_file: Path) -> None:
    key = KeyRing(store).ensure_local_key(key_file)
    store.close()
    s2 = Store(tmp_path / "corral.db")
    p = KeyRing(s2).authenticate(f"Bearer {key}")
    assert p.role == "admin"
    s2.close()


@pytest.fixture
def ring_and_key(store: Store, key_file: Path) -> tuple[KeyRing, str]:
    ring = KeyRing(store)
    key = ring.ensure_local_key(key_file)
    assert key is not None
    return ring, key


def test_bearer_key_is_accepted(ring_and_key: tuple[KeyRing, str], store: Store) -> None:
    ring, key = ring_and_key
    (row,) = store.api_keys()
    assert ring.authenticate(f"Bearer {key}") == Principal(row["id"], "admin")
    assert ring.authenticate(f"bearer {key}") == Principal(row["id"], "admin")  # the scheme is case-insensitive
    assert ring.authenticate(f"Bearer {key}  ") == Principal(row["id"], "admin")


@pytest.mark.parametrize("header", [
    None, "", " ", "Bearer", "Bearer ", "Bearer    ", "Basic {key}", "Token {key}", "{key}", "Bearer{key}",
    "Bearer wrong", "Bearer {key}x", "Bearer x{key}", "Bearer {upper}", "Bearer {key}\x00", "Bearer ck_",
    "Bearer {hash}",  # the stored hash is not a key
], ids=repr)
def test_other_headers_are_refused(ring_and_key: tuple[KeyRing, str], header: str | None) -> None:
    ring, key = ring_and_key
    if header is not None:
        header = header.format(key=key, upper=key.upper(), hash=hash_key(key))
    with pytest.raises(errors.AuthenticationError) as ei:
        ring.authenticate(header)
    assert ei.value.http_status == 401 and ei.value.code == "Unauthenticated"
    assert key not in str(ei.value) and "Bearer" in ei.value.hint


def test_an_empty_keyring_refuses_everything(store: Store) -> None:
    with pytest.raises(errors.AuthenticationError, match="not valid"):
        KeyRing(store).authenticate("Bearer ck_anything")


def test_keys_added_to_the_store_are_known_to_a_new_keyring(store: Store) -> None:
    store.add_api_key("key-2", "ci", hash_key("ck_ci"), "user")
    assert KeyRing(store).authenticate("Bearer ck_ci") == Principal("key-2", "user")
