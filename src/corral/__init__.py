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
    SnapshotNotFoundError,
    TemplateNotFoundError,
    VolumeNotFoundError,
)
from corral.policy.spec import ResourcePolicy, SandboxPolicy
from corral.sdk.client import AsyncSandbox, AsyncSnapshots, AsyncVolume, Client, CommandResult, FileInfo
from corral.sdk.sync import Sandbox, Snapshots, Volume

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AsyncSandbox",
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
    "SnapshotNotFoundError",
    "Snapshots",
    "TemplateNotFoundError",
    "Volume",
    "VolumeNotFoundError",
    "__version__",
]
