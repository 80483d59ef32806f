"""User-facing policy: what a caller may ask for when creating a sandbox."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from corral.policy import defaults
from corral.policy.execpolicy import ExecPolicy
from corral.policy.network import NetworkPolicy

_TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class ResourcePolicy(BaseModel):
    """cgroup limits. Absent fields take the defaults in ``corral.policy.defaults``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The kernel's smallest CFS quota is 1 ms per 100 ms period.
    cpu_cores: float = Field(defaults.CPU_CORES, ge=0.01, le=256)
    memory_mib: int = Field(defaults.MEMORY_MIB, ge=16, le=1024 * 1024)
    pids_max: int = Field(defaults.PIDS_MAX, ge=8, le=1_000_000)
    disk_mib: int = Field(defaults.DISK_MIB, ge=64, le=16 << 20, description="size of the writable layer")


_FORBIDDEN_MOUNTS = ("/", "/proc", "/sys", "/dev", "/.corral", "/tmp/.X11-unix")


class VolumeMount(BaseModel):
    """A named volume attached at a path inside the sandbox."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    read_only: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TEMPLATE_NAME.fullmatch(v):
            raise ValueError("volume names are 1-63 chars of a-z, 0-9, '.', '_' and '-'")
        return v


class SandboxPolicy(BaseModel):
    """Everything a sandbox is allowed to be. Deny is the default; weakening is spelled out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = "base"
    snapshot: str | None = Field(None, description="start from this snapshot (id or name) instead of a bare template")
    root: Literal["template", "host"] = "template"
    timeout_s: int | None = Field(None, ge=1, le=365 * 86400, description="wall clock; then on_timeout")
    idle_timeout_s: int | None = Field(None, ge=1, le=365 * 86400,
                                       description="no API activity and no CPU use for this long; then on_idle")
    on_idle: Literal["pause", "hibernate", "stop"] = "pause"
    on_timeout: Literal["stop", "pause", "hibernate", "delete"] = "stop"
    hibernatable: bool = Field(False, description="can be hibernated (pause to disk): runs on runc + CRIU, "
                                                  "~20 ms slower to start; implied by on_idle/on_timeout=hibernate")
    resources: ResourcePolicy = Field(default_factory=lambda: ResourcePolicy())
    env: dict[str, str] = Field(default_factory=dict)
    volumes: dict[str, VolumeMount] = Field(default_factory=dict, description="mount path -> volume")
    network: NetworkPolicy | None = Field(
        None, description="egress through Corral's proxy: {'allow': [...], 'deny': [...]} of names, '*.' suffixes, "
                          "CIDRs, ':port' suffixes; absent (or 'none'): no network at all, loopback only")
    secrets: list[str] = Field(default_factory=list, max_length=64,
                               description="registered secrets the proxy injects for their bound hosts (which are "
                                           "allowed implicitly); the sandbox only sees placeholders")
    exec_policy: ExecPolicy = Field(default_factory=lambda: ExecPolicy(),
                                    description="what may execute, by SHA-256 of the content, enforced by the kernel")
    allow_weaker_isolation: bool = False

    @field_validator("template")
    @classmethod
    def _template_name(cls, v: str) -> str:
        if not _TEMPLATE_NAME.fullmatch(v):
            raise ValueError("template names are 1-63 chars of a-z, 0-9, '.', '_' and '-'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _implied(cls, data: object) -> object:
        if isinstance(data, dict) and "hibernate" in (data.get("on_idle"), data.get("on_timeout")):
            data = {**data, "hibernatable": True}
        return data

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, v: object) -> object:
        return None if v == "none" else v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _TEMPLATE_NAME.fullmatch(name):
                raise ValueError(f"invalid secret name {name!r}: 1-63 chars of a-z, 0-9, '.', '_' and '-'")
        if len(set(v)) != len(v):
            raise ValueError("a secret is listed twice")
        return v

    @model_validator(mode="after")
    def _secrets_need_network(self) -> SandboxPolicy:
        if self.secrets and self.network is None:
            raise ValueError("secrets are injected by the egress proxy: give the sandbox a network policy too "
                             "(network={'allow': [...]}, which may be empty)")
        return self

    @field_validator("snapshot")
    @classmethod
    def _snapshot_ref(cls, v: str | None) -> str | None:
        if v is not None and not _TEMPLATE_NAME.fullmatch(v):
            raise ValueError("snapshot references are ids (snap-…) or names of 1-63 chars of a-z, 0-9, '.', '_', '-'")
        return v

    @field_validator("volumes", mode="before")
    @classmethod
    def _volumes(cls, v: object) -> object:
        if not isinstance(v, dict):
            return v
        out = {}
        for path, mount in v.items():
            p = str(path)
            if not p.startswith("/") or ".." in p.split("/") or "\x00" in p or p.rstrip("/") != p:
                raise ValueError(f"volume mount path {p!r} must be absolute, without '..' or a trailing '/'")
            if any(p == f or p.startswith(f + "/") for f in _FORBIDDEN_MOUNTS if f != "/") or p == "/":
                raise ValueError(f"cannot mount a volume at {p!r}")
            out[p] = {"name": mount} if isinstance(mount, str) else mount
        return out

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if not _ENV_NAME.fullmatch(k):
                raise ValueError(f"invalid environment variable name {k!r}")
            if "\x00" in val:
                raise ValueError(f"environment variable {k} contains a NUL byte")
        return v

    def weakenings(self) -> list[str]:
        """Options that make this sandbox weaker than the default, shown in its status."""
        out = []
        if self.root == "host":
            out.append("root=host: the host filesystem is visible read-only")
        return out
