"""The one exception tree of Corral.

Every error has a stable ``code`` (a CamelCase string that never changes), the HTTP status the
daemon answers with, and a message that says what failed and what to do about it. The daemon
serialises errors as ``{"error": {"code", "message", "hint", "details"}}``; the SDK turns that body
back into the same class, so callers catch the same types locally and remotely.

::

    CorralError
    ├── InvalidRequestError            400  InvalidRequest
    │   ├── InvalidPathError           400  InvalidPath
    │   └── PolicyRejectedError        400  PolicyRejected
    ├── AuthenticationError            401  Unauthenticated
    ├── NotFoundError                  404  NotFound
    │   ├── SandboxNotFoundError       404  SandboxNotFound
    │   ├── TemplateNotFoundError      404  TemplateNotFound
    │   ├── SnapshotNotFoundError      404  SnapshotNotFound
    │   ├── SecretNotFoundError        404  SecretNotFound
    │   ├── VolumeNotFoundError        404  VolumeNotFound
    │   ├── ProcessNotFoundError       404  ProcessNotFound
    │   └── FileNotFoundInSandboxError 404  FileNotFound
    ├── ConflictError                  409  Conflict
    │   ├── SandboxNotRunningError     409  SandboxNotRunning
    │   └── FileConflictError          409  FileConflict
    ├── PayloadTooLargeError           413  PayloadTooLarge
    ├── CommandTimeoutError            408  CommandTimeout
    ├── RuntimeUnavailableError        503  RuntimeUnavailable
    ├── DaemonUnreachableError         503  DaemonUnreachable   (raised by the SDK only)
    └── InternalError                  500  Internal
        └── AgentError                 502  AgentError
"""

from __future__ import annotations

from typing import Any, ClassVar


class CorralError(Exception):
    code: ClassVar[str] = "CorralError"
    http_status: ClassVar[int] = 500
    default_hint: ClassVar[str] = ""

    def __init__(self, message: str, *, hint: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint, "details": self.details}}


class InvalidRequestError(CorralError):
    code = "InvalidRequest"
    http_status = 400
    default_hint = "fix the request as the message says and send it again"


class InvalidPathError(InvalidRequestError):
    code = "InvalidPath"
    default_hint = "use an absolute path inside the sandbox without '..' components or NUL bytes"


class PolicyRejectedError(InvalidRequestError):
    code = "PolicyRejected"
    default_hint = "change the sandbox policy, or pass allow_weaker_isolation=True if you accept it"


class AuthenticationError(CorralError):
    code = "Unauthenticated"
    http_status = 401
    default_hint = "send 'Authorization: Bearer <key>'; the local key is in /var/lib/corral/api-key or $CORRAL_API_KEY"


class NotFoundError(CorralError):
    code = "NotFound"
    http_status = 404


class SandboxNotFoundError(NotFoundError):
    code = "SandboxNotFound"
    default_hint = "list sandboxes with `corral sandbox ls`"


class TemplateNotFoundError(NotFoundError):
    code = "TemplateNotFound"
    default_hint = "list templates with `corral template ls`; built-in ones are 'base' and 'busybox'"


class SnapshotNotFoundError(NotFoundError):
    code = "SnapshotNotFound"
    default_hint = "list snapshots with `corral snapshot ls`"


class SecretNotFoundError(NotFoundError):
    code = "SecretNotFound"
    default_hint = "list secrets with `corral secret ls`; register one with `corral secret set NAME --host HOST`"


class VolumeNotFoundError(NotFoundError):
    code = "VolumeNotFound"
    default_hint = "list volumes with `corral volume ls`; create one with Volume.create(name)"


class ProcessNotFoundError(NotFoundError):
    code = "ProcessNotFound"
    default_hint = "list processes with sb.commands.list()"


class FileNotFoundInSandboxError(NotFoundError):
    code = "FileNotFound"
    default_hint = "check the path with sb.files.list() on its parent directory"


class ConflictError(CorralError):
    code = "Conflict"
    http_status = 409


class SandboxNotRunningError(ConflictError):
    code = "SandboxNotRunning"
    default_hint = "start it with sb.start() or `corral sandbox start <id>`"


class FileConflictError(ConflictError):
    code = "FileConflict"
    default_hint = "the path exists with another type, or a directory is not empty"


class PayloadTooLargeError(CorralError):
    code = "PayloadTooLarge"
    http_status = 413
    default_hint = "send large files in several smaller writes or raise the daemon's max_upload_bytes"


class CommandTimeoutError(CorralError):
    code = "CommandTimeout"
    http_status = 408
    default_hint = "raise timeout_s or run the command with background=True"


class RuntimeUnavailableError(CorralError):
    code = "RuntimeUnavailable"
    http_status = 503
    default_hint = "run `corral doctor` to see what this host supports"


class DaemonUnreachableError(CorralError):
    code = "DaemonUnreachable"
    http_status = 503
    default_hint = "start the daemon with `corral up --background`, or set CORRAL_URL"


class InternalError(CorralError):
    code = "Internal"
    http_status = 500
    default_hint = "see the daemon log; this is a bug worth reporting"


class AgentError(InternalError):
    code = "AgentError"
    http_status = 502
    default_hint = "the in-sandbox agent failed; restart the sandbox with stop/start"


def _all_subclasses(cls: type[CorralError]) -> list[type[CorralError]]:
    out: list[type[CorralError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


ERRORS_BY_CODE: dict[str, type[CorralError]] = {c.code: c for c in _all_subclasses(CorralError)}
# For codes this SDK does not know (a newer daemon): the most general class of that status.
_BY_STATUS: dict[int, type[CorralError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 404: NotFoundError, 408: CommandTimeoutError,
    409: ConflictError, 413: PayloadTooLargeError, 500: InternalError, 502: AgentError,
    503: RuntimeUnavailableError,
}


def from_body(status: int, body: Any) -> CorralError:
    """Rebuild an error from a daemon response body (used by the SDK)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return InternalError(f"daemon answered HTTP {status} with an unexpected body: {str(body)[:200]}")
    cls = ERRORS_BY_CODE.get(str(err.get("code"))) or _BY_STATUS.get(status) or (
        InternalError if status >= 500 else InvalidRequestError if status >= 400 else CorralError)
    hint = err.get("hint")
    details = err.get("details")
    return cls(str(err.get("message", "")), hint=hint if isinstance(hint, str) else None,
               details=details if isinstance(details, dict) else {})
