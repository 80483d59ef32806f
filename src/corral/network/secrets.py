"""Secrets at rest (AES-256-GCM) and the per-installation CA used to terminate brokered TLS.

The value of a secret leaves this module only through :meth:`SecretStore.get_value`, which the
egress proxy calls at injection time; listings carry names, bindings and placeholders only.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import os
import secrets as pysecrets
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.policy.network import SecretBinding

KEY_ENV = "CORRAL_SECRET_KEY"
RECHECK_S = 0.5  # a change by another process is seen within this long
_PLACEHOLDER_PREFIX = "corral-placeholder-"


class SecretError(ValueError):
    """A secret that cannot be stored or found. Never carries the value."""


@dataclass(frozen=True)
class SecretInfo:
    name: str
    binding: SecretBinding
    placeholder: str


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 from the start (never briefly world-readable)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _decode_key(text: str) -> bytes:
    text = text.strip()
    for decode in (bytes.fromhex, base64.urlsafe_b64decode, base64.b64decode):
        try:
            key = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(key) == 32:
            return key
    raise SecretError(f"{KEY_ENV} must be 32 bytes, hex or base64 encoded")


def _placeholder(name: str, value_len: int) -> str:
    # Length class: rounded up to 16 and at least 48, so the placeholder does not give the exact
    # length of the value away and fits where the value fits (F9).
    target = max(48, -(-(value_len + len(_PLACEHOLDER_PREFIX) + len(name) + 1) // 16) * 16)
    head = f"{_PLACEHOLDER_PREFIX}{name}-"
    n = max(16, target - len(head))
    return head + pysecrets.token_hex(n)[:n]


class SecretStore:
    """Named secrets in ``dir/secrets.json``, each value sealed with AES-GCM (AAD: its name).

    The key is ``$CORRAL_SECRET_KEY`` (32 bytes, hex or base64) or ``dir/secret.key`` (mode 0600,
    created on first use)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self._lock = threading.Lock()
        self._key: bytes | None = None
        self._cache: tuple[tuple[int, int, int], dict[str, dict[str, str]]] | None = None
        self._checked = 0.0
        self._aesgcm: AESGCM | None = None

    def _aead(self) -> AESGCM:
        if self._aesgcm is not None:
            return self._aesgcm
        if self._key is None:
            env = os.environ.get(KEY_ENV)
            if env:
                self._key = _decode_key(env)
            else:
                self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                path = self.dir / "secret.key"
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    key = path.read_bytes()
                    if len(key) != 32:
                        raise SecretError(f"{path} is not a 32-byte key") from None
                    self._key = key
                else:
                    key = AESGCM.generate_key(bit_length=256)
                    with os.fdopen(fd, "wb") as f:
                        f.write(key)
                    self._key = key
        self._aesgcm = AESGCM(self._key)
        return self._aesgcm

    def _load(self) -> dict[str, dict[str, str]]:
        # The proxy reads on every brokered request: keep the (sealed) file in memory while it is
        # unchanged on disk. Another process's write changes the mtime/size/inode and is picked up.
        path = self.dir / "secrets.json"
        now = time.monotonic()
        if self._cache is not None and now - self._checked < RECHECK_S:
            return dict(self._cache[1])
        self._checked = now
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cache is not None and self._cache[0] == stamp:
            return dict(self._cache[1])
        data: dict[str, dict[str, str]] = json.loads(path.read_text())
        self._cache = (stamp, data)
        return dict(data)

    def _save(self, data: dict[str, dict[str, str]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(self.dir / "secrets.json", json.dumps(data, indent=1, sort_keys=True).encode())
        self._cache = None

    def set(self, binding: SecretBinding, value: str) -> SecretInfo:
        if not value:
            raise SecretError("a secret value cannot be empty")
        if any(c in value for c in "\r\n\x00") or len(value) > 16384:
            raise SecretError("a secret value must be one line of at most 16 KiB without NUL")
        with self._lock:
            aead = self._aead()
            data = self._load()
            nonce = os.urandom(12)
            sealed = aead.encrypt(nonce, value.encode(), binding.name.encode())
            old = data.get(binding.name)
            placeholder = old["placeholder"] if old else _placeholder(binding.name, len(value))
            data[binding.name] = {
                "binding": binding.model_dump_json(),
                "nonce": base64.b64encode(nonce).decode(),
                "sealed": base64.b64encode(sealed).decode(),
                "placeholder": placeholder,
            }
            self._save(data)
        return SecretInfo(binding.name, binding, placeholder)

    def list(self) -> list[SecretInfo]:
        with self._lock:
            data = self._load()
        return [SecretInfo(n, SecretBinding.model_validate_json(d["binding"]), d["placeholder"])
                for n, d in sorted(data.items())]

    def info(self, name: str) -> SecretInfo:
        with self._lock:
            d = self._load().get(name)
        if d is None:
            raise SecretError(f"no secret named {name!r}; register it with `corral secret set {name}`")
        return SecretInfo(name, SecretBinding.model_validate_json(d["binding"]), d["placeholder"])

    def placeholder(self, name: str) -> str:
        return self.info(name).placeholder

    def delete(self, name: str) -> None:
        with self._lock:
            data = self._load()
            if data.pop(name, None) is None:
                raise SecretError(f"no secret named {name!r}")
            self._save(data)

    def get_value(self, name: str) -> str:
        """Internal: the plaintext, for the proxy at injection time. Never log or return it."""
        with self._lock:
            d = self._load().get(name)
            if d is None:
                raise SecretError(f"no secret named {name!r}")
            try:
                plain = self._aead().decrypt(base64.b64decode(d["nonce"]), base64.b64decode(d["sealed"]),
                                             name.encode())
            except Exception as e:  # InvalidTag: wrong key or tampered file; say so without details
                raise SecretError(f"secret {name!r} cannot be decrypted (wrong key or tampered store)") from e
        return plain.decode()


class CertificateAuthority:
    """A per-installation CA (``dir/ca.key`` 0600, ``dir/ca.pem``) that issues leaf certificates
    for brokered host names on demand; leaves are cached in memory and under ``dir/leaves``."""

    LEAF_DAYS = 30

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self._lock = threading.Lock()
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, cert_path = self.dir / "ca.key", self.dir / "ca.pem"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise SecretError(f"{key_path} is not an EC key")
            self._key = key
            self._cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        else:
            self._key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corral sandbox egress CA"),
                              x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Corral")])
            now = datetime.datetime.now(datetime.UTC)
            self._cert = (
                x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
                .sign(self._key, hashes.SHA256())
            )
            _write_private(key_path, self._key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
            cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
            cert_path.chmod(0o644)
        self.ca_path = cert_path

    @property
    def ca_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def leaf_pem(self, hostname: str) -> tuple[bytes, bytes]:
        """(certificate chain PEM, key PEM) for ``hostname``."""
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])]))
            .issuer_name(self._cert.subject).public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=self.LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.ca_pem
        key = self._leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
        return chain, key

    def server_context(self, hostname: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for ``hostname``, HTTP/1.1 only (no h2)."""
        with self._lock:
            ctx = self._contexts.get(hostname)
            if ctx is not None:
                return ctx
            chain, key = self.leaf_pem(hostname)
            leaves = self.dir / "leaves"
            leaves.mkdir(exist_ok=True, mode=0o700)
            cert_file, key_file = leaves / f"{hostname}.pem", leaves / f"{hostname}.key"
            _write_private(cert_file, chain)
            _write_private(key_file, key)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(cert_file, key_file)
            ctx.set_alpn_protocols(["http/1.1"])
            self._contexts[hostname] = ctx
            return ctx
