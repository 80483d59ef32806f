"""Corral: self-hosted, secure, persistent sandboxes for AI coding agents.

This module is the public SDK surface only; ``__all__`` is pinned by a test.
"""

from corral.errors import (
    AgentError,
    AuthenticationError,
    CommandTimeoutError,
    ConflictError,
    CorralError,
    DaemonUnreachableError,
    FileConflictError,
    FileNotFoundInSandboxError,
    InternalError,
    InvalidPathError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PolicyRejectedError,
    ProcessNotFoundError,
    RuntimeUnavailableError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SecretNotFoundError,
    SnapshotNotFoundError,
    TemplateNotFoundError,
    VolumeNotFoundError,
)
from corral.policy.network import NetworkPolicy
from corral.policy.spec import ResourcePolicy, SandboxPolicy
from corral.sdk.client import (
    AsyncSandbox,
    AsyncSecrets,
    AsyncSnapshots,
    AsyncVolume,
    Client,
    CommandResult,
    FileInfo,
)
from corral.sdk.sync import Sandbox, Secrets, Snapshots, Volume

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AsyncSandbox",
    "AsyncSecrets",
    "AsyncSnapshots",
    "AsyncVolume",
    "AuthenticationError",
    "Client",
    "CommandResult",
    "CommandTimeoutError",
    "ConflictError",
    "CorralError",
    "DaemonUnreachableError",
    "FileConflictError",
    "FileInfo",
    "FileNotFoundInSandboxError",
    "InternalError",
    "InvalidPathError",
    "InvalidRequestError",
    "NetworkPolicy",
    "NotFoundError",
    "PayloadTooLargeError",
    "PolicyRejectedError",
    "ProcessNotFoundError",
    "ResourcePolicy",
    "RuntimeUnavailableError",
    "Sandbox",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxPolicy",
    "SecretNotFoundError",
    "Secrets",
    "SnapshotNotFoundError",
    "Snapshots",
    "TemplateNotFoundError",
    "Volume",
    "VolumeNotFoundError",
    "__version__",
]
