"""Synchronous facade over the async SDK: every call runs on one background event loop."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from corral.api import models as m
from corral.policy.network import NetworkPolicy
from corral.sdk import client as c

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="corral-sdk", daemon=True).start()
            _loop = loop
        return _loop


def _close_at_exit() -> None:
    loop = _loop
    if loop is None or loop.is_closed() or not loop.is_running():
        return
    client = c._defaults.get(loop)
    if client is not None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(5)


atexit.register(_close_at_exit)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run an SDK coroutine from synchronous code."""
    return asyncio.run_coroutine_threadsafe(coro, _get_loop()).result()


class CommandHandle:
    def __init__(self, inner: c.AsyncCommandHandle):
        self._h = inner
        self.pid = inner.pid

    def wait(self, on_stdout: c.Callback | None = None, on_stderr: c.Callback | None = None) -> c.CommandResult:
        return run(self._h.wait(on_stdout, on_stderr))

    def kill(self, signal: int = 9) -> None:
        run(self._h.kill(signal))

    def send_stdin(self, data: str | bytes, eof: bool = False) -> None:
        run(self._h.send_stdin(data, eof))


class Commands:
    def __init__(self, inner: c.AsyncCommands):
        self._c = inner

    def run(self, cmd: str | list[str], **kw: Any) -> Any:
        if not kw.get("background") and kw.get("on_stdout") is None and kw.get("on_stderr") is None:
            # Plain request/response: straight from this thread (no hop to the SDK's event loop).
            sb = self._c._sb
            kw.setdefault("timeout_s", 60)
            body = c.exec_body(cmd, **kw)
            return c.exec_result(sb._client.json_sync("POST", f"/sandboxes/{sb.id}/exec", json=body), kw["timeout_s"])
        r = run(self._c.run(cmd, **kw))
        return CommandHandle(r) if isinstance(r, c.AsyncCommandHandle) else r

    def list(self) -> list[m.ProcessInfo]:
        return run(self._c.list())

    def kill(self, pid: int, signal: int = 9) -> None:
        run(self._c.kill(pid, signal))

    def connect(self, pid: int) -> CommandHandle:
        return CommandHandle(run(self._c.connect(pid)))

    def send_stdin(self, pid: int, data: str | bytes, eof: bool = False) -> None:
        run(self._c.send_stdin(pid, data, eof))


class PtyHandle:
    def __init__(self, inner: c.AsyncPtyHandle):
        self._h = inner
        self.pid = inner.pid

    def send(self, data: str | bytes) -> None:
        run(self._h.send(data))

    def resize(self, rows: int, cols: int) -> None:
        run(self._h.resize(rows, cols))

    def kill(self, signal: int = 9) -> None:
        run(self._h.kill(signal))

    def output(self) -> Iterator[bytes]:
        agen = self._h.output()

        async def step() -> bytes:
            return await agen.__anext__()

        while True:
            try:
                yield run(step())
            except StopAsyncIteration:
                return

    @property
    def exit_code(self) -> int | None:
        return getattr(self._h, "exit_code", None)

    def close(self) -> None:
        run(self._h.close())


class Pty:
    def __init__(self, inner: c.AsyncPty):
        self._p = inner

    def create(self, rows: int = 24, cols: int = 80, cmd: str | None = None, **kw: Any) -> PtyHandle:
        return PtyHandle(run(self._p.create(rows, cols, cmd, **kw)))


class Files:
    def __init__(self, inner: c.AsyncFiles):
        self._f = inner

    def read(self, path: str) -> bytes:
        return run(self._f.read(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return run(self._f.read_text(path, encoding))

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> m.WriteResult:
        return run(self._f.write(path, data, mode))

    def list(self, path: str, depth: int = 1) -> list[c.FileInfo]:
        return run(self._f.list(path, depth))

    def stat(self, path: str) -> c.FileInfo:
        return run(self._f.stat(path))

    def exists(self, path: str) -> bool:
        return run(self._f.exists(path))

    def mkdir(self, path: str, parents: bool = True) -> c.FileInfo:
        return run(self._f.mkdir(path, parents))

    def remove(self, path: str, recursive: bool = True) -> None:
        run(self._f.remove(path, recursive))

    def rename(self, src: str, dst: str) -> c.FileInfo:
        return run(self._f.rename(src, dst))


class Audit:
    def __init__(self, inner: c.AsyncAudit):
        self._a = inner

    def list(self, kind: str | None = None, since: float | None = None, until: float | None = None,
             after: int = 0, limit: int = 1000) -> list[m.AuditRecord]:
        return run(self._a.list(kind, since, until, after, limit))

    def stream(self, kind: str | None = None, after: int | None = None) -> Iterator[m.AuditRecord]:
        """Records as they are written; stop iterating (break) to close the stream."""
        agen = self._a.stream(kind, after)

        async def step() -> m.AuditRecord:
            return await agen.__anext__()

        try:
            while True:
                try:
                    yield run(step())
                except StopAsyncIteration:
                    return
        finally:
            run(agen.aclose())

    def verify(self) -> m.AuditVerify:
        return run(self._a.verify())


class Network:
    def __init__(self, inner: c.AsyncNetwork):
        self._n = inner

    @property
    def policy(self) -> NetworkPolicy | None:
        return self._n.policy

    def update(self, allow: list[str] | None = None, deny: list[str] | None = None) -> NetworkPolicy | None:
        """New allow and/or deny lists; new connections follow them at once."""
        return run(self._n.update(allow, deny))


class Sandbox:
    """A Corral sandbox (synchronous). ``with Sandbox.create(...) as sb:`` kills it on exit."""

    def __init__(self, inner: c.AsyncSandbox):
        self._sb = inner
        self.commands = Commands(inner.commands)
        self.files = Files(inner.files)
        self.pty = Pty(inner.pty)
        self.audit = Audit(inner.audit)
        self.network = Network(inner.network)

    @property
    def id(self) -> str:
        return self._sb.id

    @property
    def info(self) -> m.SandboxInfo:
        return self._sb.info

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.info.status}>"

    @classmethod
    def create(cls, template: str = "base", timeout_s: int | None = None, *, client: c.Client | None = None,
               **policy: Any) -> Sandbox:
        return cls(run(c.AsyncSandbox.create(template, timeout_s, client=client, **policy)))

    @classmethod
    def connect(cls, sandbox_id: str, *, client: c.Client | None = None) -> Sandbox:
        return cls(run(c.AsyncSandbox.connect(sandbox_id, client=client)))

    @classmethod
    def list(cls, *, client: c.Client | None = None) -> list[m.SandboxInfo]:
        return run(c.AsyncSandbox.list(client=client))

    def refresh(self) -> m.SandboxInfo:
        return run(self._sb.refresh())

    def is_running(self) -> bool:
        return run(self._sb.is_running())

    def stop(self) -> m.SandboxInfo:
        return run(self._sb.stop())

    def start(self) -> m.SandboxInfo:
        return run(self._sb.start())

    def snapshot(self, name: str | None = None) -> m.SnapshotInfo:
        return run(self._sb.snapshot(name))

    def pause(self, to_disk: bool = False) -> m.SandboxInfo:
        return run(self._sb.pause(to_disk))

    def resume(self) -> m.SandboxInfo:
        return run(self._sb.resume())

    def set_timeout(self, timeout_s: int | None = None, idle_timeout_s: int | None = None) -> m.SandboxInfo:
        return run(self._sb.set_timeout(timeout_s, idle_timeout_s))

    def kill(self) -> None:
        run(self._sb.kill())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class Snapshots:
    """Snapshots of the daemon (sync): list, get and delete."""

    @staticmethod
    def list(*, client: c.Client | None = None) -> list[m.SnapshotInfo]:
        return run(c.AsyncSnapshots.list(client=client))

    @staticmethod
    def get(ref: str, *, client: c.Client | None = None) -> m.SnapshotInfo:
        return run(c.AsyncSnapshots.get(ref, client=client))

    @staticmethod
    def delete(ref: str | m.SnapshotInfo, *, client: c.Client | None = None) -> None:
        run(c.AsyncSnapshots.delete(ref, client=client))


class Volume:
    """Named persistent volumes (sync): ``vol = Volume.create("cache")``; ``Sandbox.create(volumes={"/cache": vol})``."""

    @staticmethod
    def create(name: str, size_mib: int = 1024, *, client: c.Client | None = None) -> m.VolumeInfo:
        return run(c.AsyncVolume.create(name, size_mib, client=client))

    @staticmethod
    def list(*, client: c.Client | None = None) -> list[m.VolumeInfo]:
        return run(c.AsyncVolume.list(client=client))

    @staticmethod
    def get(name: str, *, client: c.Client | None = None) -> m.VolumeInfo:
        return run(c.AsyncVolume.get(name, client=client))

    @staticmethod
    def delete(name: str | m.VolumeInfo, *, client: c.Client | None = None) -> None:
        run(c.AsyncVolume.delete(name, client=client))


class Secrets:
    """Credentials the egress proxy injects (sync): ``Secrets.set("github", token, hosts=["github.com"])``."""

    @staticmethod
    def set(name: str, value: str, hosts: list[str], *, header: str | None = None, template: str | None = None,
            basic_username: str | None = None, placeholder_headers: list[str] | None = None,
            env: str | None = None, allow_requests: list[str] | None = None,
            client: c.Client | None = None) -> m.SecretInfo:
        return run(c.AsyncSecrets.set(name, value, hosts, header=header, template=template,
                                      basic_username=basic_username, placeholder_headers=placeholder_headers,
                                      env=env, allow_requests=allow_requests, client=client))

    @staticmethod
    def list(*, client: c.Client | None = None) -> list[m.SecretInfo]:
        return run(c.AsyncSecrets.list(client=client))

    @staticmethod
    def delete(name: str, *, client: c.Client | None = None) -> None:
        run(c.AsyncSecrets.delete(name, client=client))
