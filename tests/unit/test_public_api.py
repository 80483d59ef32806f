"""The public SDK surface: ``corral.__all__`` is pinned; changing it is an API change."""

from __future__ import annotations

import importlib

import pytest

import corral
from corral import errors

PUBLIC = [
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


def test_all_is_pinned_and_sorted() -> None:
    assert corral.__all__ == PUBLIC
    assert PUBLIC == sorted(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_importable(name: str) -> None:
    assert getattr(importlib.import_module("corral"), name) is not None


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from corral import *", ns)
    assert sorted(k for k in ns if k != "__builtins__") == PUBLIC


def test_version() -> None:
    assert isinstance(corral.__version__, str) and corral.__version__.count(".") == 2


def test_public_errors_are_the_tree_classes() -> None:
    for name in PUBLIC:
        obj = getattr(corral, name)
        if name.endswith("Error"):
            assert obj is getattr(errors, name) and issubclass(obj, errors.CorralError)


def test_every_error_a_client_can_receive_is_exported() -> None:
    sdk_visible = {c.__name__ for c in errors._all_subclasses(errors.CorralError)}
    assert sdk_visible <= set(corral.__all__)
