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
)
from corral.policy.spec import ResourcePolicy, SandboxPolicy
from corral.sdk.client import AsyncSandbox, AsyncSnapshots, Client, CommandResult, FileInfo
from corral.sdk.sync import Sandbox, Snapshots

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AsyncSandbox",
    "AsyncSnapshots",
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
    "__version__",
]
