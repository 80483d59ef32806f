"""Exec policy: what may execute in a sandbox, decided by the SHA-256 of the file's content.

Pure: the user's ``ExecPolicy`` plus the facts about a template (``ExecIndex``, built by
``corral.execguard.index``) compile into an ``ExecPlan`` that the guard enforces.

Rules, in order (the first that matches decides):
1. the file is one of Corral's own agent runtime files (``/.corral/rt``, by file identity): denied;
   the agent never executes again after it booted, so anything exec'ing it is the sandbox using
   Corral's Python or loader as a gadget;
2. the content's hash is denied (by hash, or by a name resolved to hashes in the template);
3. allowlist mode and the hash is neither in the template nor allowed by name/hash: denied;
4. a dynamic loader (``ld-linux-x86-64.so.2``) run as a program (not as the interpreter the kernel
   loads for a dynamic binary): denied, because the loader maps its argument without an exec, which
   would otherwise run any denied file (``ld.so ./copy-of-npx``);
5. otherwise allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from corral.errors import PolicyRejectedError

_SHA = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9._+-]{0,254}$")
TEMPLATE = "template"
MAX_HASH_MIB = 256


def _check_entries(v: list[str], allow_template: bool) -> list[str]:
    out: list[str] = []
    for raw in v:
        e = raw.strip()
        if e.lower().startswith("sha256:"):
            e = e.lower()
            if not _SHA.fullmatch(e):
                raise ValueError(f"{raw!r} is not sha256: followed by 64 hex digits")
        elif e == TEMPLATE:
            if not allow_template:
                raise ValueError("'template' is only meaningful in allow")
        elif not _NAME.fullmatch(e) or e in (".", ".."):
            raise ValueError(f"{raw!r} is neither a program name (like 'npx', no '/') nor sha256:<hex>")
        if e not in out:
            out.append(e)
    return out


class ExecPolicy(BaseModel):
    """Which binaries may run. ``deny`` and ``allow`` take program names (resolved to the hashes of
    the matching files in the template when the sandbox is created) or ``sha256:<hex>``; ``allow``
    also takes ``template`` (every executable the template ships)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["off", "audit", "enforce"] = Field(
        "off", description="enforce: refuse denied execs (EPERM); audit: let them run and record them; off: no guard")
    deny: list[str] = Field(default_factory=list)
    allow: list[str] | None = Field(None, description="allowlist mode when set: only these may run")
    max_hash_mib: int = Field(MAX_HASH_MIB, ge=1, le=4096,
                              description="a larger executable cannot be hashed in bounded time: refused in enforce mode")

    @field_validator("deny")
    @classmethod
    def _deny(cls, v: list[str]) -> list[str]:
        return _check_entries(v, allow_template=False)

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _check_entries(v, allow_template=True)

    @model_validator(mode="after")
    def _consistent(self) -> ExecPolicy:
        if self.mode == "off" and (self.deny or self.allow is not None):
            raise ValueError("exec_policy has rules but mode is 'off': set mode to 'enforce' or 'audit'")
        return self


@dataclass(frozen=True)
class ExecIndex:
    """Facts about a root filesystem's executables (built by corral.execguard.index)."""

    files: dict[str, str] = field(default_factory=dict)  # path inside the sandbox -> sha256 hex
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # program name -> sha256 hexes
    loaders: frozenset[str] = frozenset()  # sha256 of dynamic loaders (ld-linux*.so*)
    complete: bool = True  # False: only some directories were indexed (host root)


@dataclass(frozen=True)
class ExecPlan:
    mode: Literal["off", "audit", "enforce"]
    deny: dict[str, str]  # sha256 hex -> the rule that denies it ("deny:npx", "deny:sha256:…")
    allow: frozenset[str] | None  # None: no allowlist
    loaders: frozenset[str]
    max_hash_bytes: int

    @property
    def active(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str


def compile_exec(policy: ExecPolicy, index: ExecIndex, template: str = "") -> ExecPlan:
    """Resolve names to hashes. A name that matches nothing is an error: a rule that can never fire
    would look like protection and be none."""
    deny: dict[str, str] = {}
    for e in policy.deny:
        for h in _resolve(e, index, template):
            deny.setdefault(h, f"deny:{e}")
    allow: frozenset[str] | None = None
    if policy.allow is not None:
        hashes: set[str] = set()
        for e in policy.allow:
            if e == TEMPLATE:
                if not index.complete:
                    raise PolicyRejectedError("allow=['template'] needs a template; this sandbox's root has none",
                                              hint="list the allowed programs by name or sha256 instead")
                hashes.update(index.files.values())
            else:
                hashes.update(_resolve(e, index, template))
        # The template's dynamic loaders come with any allowed dynamic binary (the kernel loads them
        # as its interpreter); run as programs they are still refused by the loader rule.
        allow = frozenset(hashes | index.loaders)
    return ExecPlan(mode=policy.mode, deny=deny, allow=allow, loaders=index.loaders,
                    max_hash_bytes=policy.max_hash_mib * 1024 * 1024)


def _resolve(entry: str, index: ExecIndex, template: str) -> tuple[str, ...]:
    if entry.startswith("sha256:"):
        return (entry.removeprefix("sha256:"),)
    hashes = index.names.get(entry)
    if not hashes:
        where = f"template {template!r}" if template else "this sandbox's root"
        raise PolicyRejectedError(f"exec_policy names {entry!r}, but no executable of that name is in {where}",
                                  hint="give its content hash as sha256:<hex> instead, or check the spelling")
    return hashes


def decide(plan: ExecPlan, sha256: str, as_program_loader: bool, corral_runtime: bool = False) -> Verdict:
    """The verdict for one exec of content ``sha256``. ``as_program_loader``: a dynamic loader run as
    the program itself rather than as a binary's interpreter; ``corral_runtime``: the file is one of
    the agent runtime's own."""
    if corral_runtime:
        return Verdict(False, "corral-runtime")
    rule = plan.deny.get(sha256)
    if rule is not None:
        return Verdict(False, rule)
    if plan.allow is not None and sha256 not in plan.allow:
        return Verdict(False, "allowlist")
    if as_program_loader:
        return Verdict(False, "loader")
    return Verdict(True, "allowlist" if plan.allow is not None else "default")
