"""Wire models shared by the daemon and the SDK; the source of the OpenAPI document."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from corral.policy.network import BasicAuthInjection, HeaderInjection, PlaceholderInjection
from corral.policy.spec import SandboxPolicy

SANDBOX_ID = re.compile(r"^sb-[0-9a-f]{12}$")
API_PREFIX = "/v1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSandboxRequest(SandboxPolicy):
    """A sandbox policy plus labels. Fields absent take the safe defaults."""

    metadata: dict[str, str] = Field(default_factory=dict)


class Timing(_Model):
    total_ms: float
    from_pool: bool = Field(False, description="claimed from the warm pool instead of booted now")
    resume_ms: float = 0.0
    template_build_ms: float = 0.0
    runtime_start_ms: float = 0.0
    agent_ready_ms: float = 0.0


class SandboxInfo(_Model):
    id: str
    template: str
    desired: Literal["running", "paused", "stopped"]
    status: Literal["creating", "running", "paused", "hibernated", "stopped", "error"]
    reason: str = Field(description="stable CamelCase reason for the status, e.g. Started, Timeout, OOMKilled")
    message: str = ""
    created_at: float
    started_at: float | None = None
    stopped_at: float | None = None
    timeout_at: float | None = None
    policy: SandboxPolicy
    weakenings: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    last_activity_at: float | None = None
    timing: Timing | None = None


class PauseRequest(_Model):
    to_disk: bool = Field(False, description="hibernate: checkpoint processes to disk and free their memory (CRIU)")


class UpdateSandboxRequest(_Model):
    """Extend or change a running sandbox's timeouts; timeout_s counts from now."""

    timeout_s: int | None = Field(None, ge=1, le=365 * 86400)
    idle_timeout_s: int | None = Field(None, ge=1, le=365 * 86400)


class NetworkUpdate(_Model):
    """New allow and/or deny lists for a networked sandbox (absent: unchanged). New connections and
    DNS answers follow them at once; open connections keep going."""

    allow: list[str] | None = Field(None, max_length=1024)
    deny: list[str] | None = Field(None, max_length=1024)


class SecretSet(_Model):
    """Register (or replace) a secret. The value is stored encrypted and never returned."""

    value: SecretStr = Field(description="the credential; one line, at most 16 KiB")
    hosts: list[str] = Field(min_length=1, max_length=64,
                             description="names ('api.github.com') or '*.' suffixes it is injected for")
    injection: HeaderInjection | BasicAuthInjection | PlaceholderInjection = Field(
        default_factory=HeaderInjection, discriminator="kind",
        description="header template (default 'Authorization: Bearer {value}'), basic auth, or placeholder "
                    "substitution in the listed headers")
    env: str | None = Field(None, description="variable that carries the placeholder in sandboxes using it")
    allow_requests: list[str] = Field(default_factory=list, max_length=64,
                                      description="'METHOD /path-glob' rules ('GET /repos/org/*'); when given, other "
                                                  "requests to the bound hosts are refused instead of authenticated")


class SecretInfo(_Model):
    name: str
    hosts: list[str]
    injection: HeaderInjection | BasicAuthInjection | PlaceholderInjection = Field(discriminator="kind")
    env: str | None = None
    allow_requests: list[str] = Field(default_factory=list)
    placeholder: str = Field(description="what sandboxes see instead of the value")


class SecretList(_Model):
    secrets: list[SecretInfo]


class SnapshotCreate(_Model):
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")


class SnapshotInfo(_Model):
    id: str
    name: str | None = None
    sandbox_id: str
    template: str
    parent: str | None = Field(None, description="the snapshot the sandbox itself started from")
    created_at: float
    files: int
    size_bytes: int = Field(description="bytes of files in this snapshot's own layer")
    new_bytes: int = Field(description="bytes that were not already stored when it was taken (deduplication)")
    in_use_by: list[str] = Field(default_factory=list, description="sandboxes and snapshots that depend on it")
    timing_ms: float | None = None


class SnapshotList(_Model):
    snapshots: list[SnapshotInfo]


class VolumeCreate(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    size_mib: int = Field(1024, ge=16, le=16 << 20)


class VolumeInfo(_Model):
    name: str
    size_mib: int
    created_at: float
    used_bytes: int | None = Field(None, description="while mounted")
    attached_to: list[str] = Field(default_factory=list)


class VolumeList(_Model):
    volumes: list[VolumeInfo]


class ImportResult(_Model):
    kind: Literal["sandbox", "snapshot"]
    snapshots: list[SnapshotInfo] = Field(description="one per layer, bottom first; the last is the top")
    sandbox: SandboxInfo | None = Field(None, description="for a sandbox backup: a stopped sandbox with its policy")


class SandboxList(_Model):
    sandboxes: list[SandboxInfo]


class ExecRequest(_Model):
    cmd: str | None = Field(None, description="a shell command line, run with bash (or sh) -c")
    argv: list[str] | None = Field(None, description="an argument vector, run without a shell")
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    stdin: str | None = Field(None, description="text written to the command's stdin, then closed")
    timeout_s: float | None = Field(None, gt=0, le=7 * 86400)
    background: bool = False
    tag: str | None = Field(None, max_length=200)
    pty: dict[str, int] | None = Field(None, description="{rows, cols} to run on a pseudo-terminal (WebSocket only)")

    @model_validator(mode="after")
    def _one_of(self) -> ExecRequest:
        if (self.cmd is None) == (self.argv is None):
            raise ValueError("give exactly one of cmd (a string) or argv (a list of strings)")
        if self.argv is not None and not self.argv:
            raise ValueError("argv must not be empty")
        for s in [self.cmd or "", *(self.argv or []), *(self.env.values()), self.cwd or ""]:
            if "\x00" in s:
                raise ValueError("command, arguments, env and cwd must not contain NUL bytes")
        return self


class ExecDenial(_Model):
    """An exec the guard refused (or, in audit mode, would have refused) while a command ran."""

    path: str = Field(description="the executed file as the kernel saw it")
    sha256: str | None = None
    rule: str = Field(description="deny:<entry>, allowlist, loader, corral-runtime, too-large, guard-error…")
    verdict: Literal["deny", "would-deny", "killed"]
    pid: int | None = None
    audit_seq: int | None = Field(None, description="the audit record of this decision")


class ExecResult(_Model):
    pid: int
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    truncated_bytes: int = 0
    duration_ms: float = 0.0
    resume_ms: float = Field(0.0, description="time spent resuming a paused or stopped sandbox first")
    background: bool = False
    denials: list[ExecDenial] = Field(default_factory=list,
                                      description="execs the exec policy refused in this sandbox while the command ran")


class ProcessInfo(_Model):
    pid: int
    argv: list[str]
    tag: str | None = None
    started_at: float
    running: bool
    pty: bool = False
    exit_code: int | None = None


class ProcessList(_Model):
    processes: list[ProcessInfo]


class SignalRequest(_Model):
    signal: int = Field(9, ge=1, le=64)


class StdinRequest(_Model):
    data: str = ""
    eof: bool = False


class FileEntry(_Model):
    path: str
    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    mtime: float
    uid: int
    gid: int
    target: str | None = None


class FileList(_Model):
    entries: list[FileEntry]


class WriteResult(_Model):
    path: str
    size: int


class PathRequest(_Model):
    path: str
    parents: bool = True


class RenameRequest(_Model):
    src: str
    dst: str


class TemplateInfo(_Model):
    name: str
    built: bool
    description: str = ""
    built_at: float | None = None
    size_bytes: int | None = None
    files: int | None = None


class TemplateList(_Model):
    templates: list[TemplateInfo]


class AuditRecord(_Model):
    seq: int
    ts: float
    key_id: str | None
    action: str
    target: str | None
    result: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class AuditList(_Model):
    records: list[AuditRecord]


class AuditVerify(_Model):
    ok: bool
    records: int
    first_bad_seq: int | None = None
    message: str


class HostFeature(_Model):
    name: str
    available: bool
    detail: str
    required: bool = False


class HostReport(_Model):
    ok: bool
    features: list[HostFeature]
    runtime: str | None


class Health(_Model):
    ok: bool
    version: str
    sandboxes_running: int
    schema_version: int
    warm_pool: dict[str, int] = Field(default_factory=dict, description="ready sandboxes per template")


class ErrorDetail(_Model):
    code: str
    message: str
    hint: str = ""
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(_Model):
    error: ErrorDetail


def check_sandbox_id(value: str) -> str:
    if not SANDBOX_ID.fullmatch(value):
        from corral.errors import SandboxNotFoundError

        raise SandboxNotFoundError(f"{value!r} is not a sandbox id (they look like sb-0123456789ab)")
    return value


class WsClientMessage(_Model):
    """Messages a client sends on an exec WebSocket after the initial ExecRequest."""

    type: Literal["stdin", "close_stdin", "signal", "resize"]
    data: str | None = None
    signal: int | None = None
    rows: int | None = None
    cols: int | None = None

    @field_validator("rows", "cols")
    @classmethod
    def _size(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= 10000:
            raise ValueError("rows and cols must be between 1 and 10000")
        return v
