"""The SDK's one implementation (async). ``corral.sdk.sync`` wraps it for synchronous code."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydantic
import websockets

from corral import errors
from corral.api import models as m
from corral.policy.network import NetworkPolicy

DEFAULT_URL = "http://127.0.0.1:7770"
DEFAULT_KEY_FILE = "/var/lib/corral/api-key"
Callback = Callable[[str], Any]


def discover() -> tuple[str, str | None]:
    """Find the daemon and its API key: $CORRAL_URL / $CORRAL_API_KEY, else the local defaults."""
    url = os.environ.get("CORRAL_URL") or (
        f"http://{os.environ.get('CORRAL_HOST', '127.0.0.1')}:{os.environ['CORRAL_PORT']}"
        if os.environ.get("CORRAL_PORT") else DEFAULT_URL)
    key = os.environ.get("CORRAL_API_KEY")
    if not key:
        path = Path(os.environ.get("CORRAL_DATA_DIR", "/var/lib/corral")) / "api-key"
        try:
            key = path.read_text().strip() or None
        except OSError:
            key = None
    return url, key


class Client:
    """HTTP + WebSocket transport to one daemon. Shared by every sandbox object made from it."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout_s: float = 600.0):
        d_url, d_key = discover()
        self.url = (url or d_url).rstrip("/")
        self.api_key = api_key or d_key
        transport = None
        base = self.url
        self._uds: str | None = None
        if self.url.startswith("unix://"):
            self._uds = self.url[len("unix://"):]
            transport = httpx.AsyncHTTPTransport(uds=self._uds)
            base = "http://corral"
        self.base = base
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._sync: httpx.Client | None = None
        self.http = httpx.AsyncClient(base_url=base + m.API_PREFIX, headers=headers, transport=transport,
                                      timeout=httpx.Timeout(timeout_s, connect=10.0))

    async def close(self) -> None:
        await self.http.aclose()
        if self._sync is not None:
            self._sync.close()

    def json_sync(self, method: str, path: str, **kw: Any) -> Any:
        """A blocking request for the sync facade's hot path (exec): async httpx costs ~0.4 ms more
        per call than its sync client. Same URL, key, timeouts and error mapping."""
        if self._sync is None:
            transport = httpx.HTTPTransport(uds=self._uds) if self._uds else None
            self._sync = httpx.Client(base_url=self.http.base_url, headers=self.http.headers,
                                      transport=transport, timeout=self.http.timeout)
        try:
            r = self._sync.request(method, path, **kw)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        self._raise_for_status(r)
        return r.json() if r.content else None

    def _unreachable(self, e: Exception) -> errors.DaemonUnreachableError:
        return errors.DaemonUnreachableError(f"cannot reach the Corral daemon at {self.url}: {e}")

    @staticmethod
    def _raise_for_status(r: httpx.Response) -> None:
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            raise errors.from_body(r.status_code, body)

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = await self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        self._raise_for_status(r)
        return r

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, **kw: Any) -> AsyncIterator[httpx.Response]:
        try:
            async with self.http.stream(method, path, **kw) as r:
                if r.status_code >= 400:
                    await r.aread()
                    self._raise_for_status(r)
                yield r
        except httpx.TransportError as e:
            raise self._unreachable(e) from None

    async def json(self, method: str, path: str, **kw: Any) -> Any:
        r = await self.request(method, path, **kw)
        return r.json() if r.content else None

    def ws_connect(self, path: str) -> Any:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self._uds:
            return websockets.unix_connect(self._uds, "ws://corral" + m.API_PREFIX + path,
                                           additional_headers=headers, max_size=16 << 20)
        ws_url = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        return websockets.connect(ws_url + m.API_PREFIX + path, additional_headers=headers, max_size=16 << 20)


_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Client] = weakref.WeakKeyDictionary()


def default_client() -> Client:
    """One shared client per event loop (an httpx client cannot cross loops)."""
    loop = asyncio.get_running_loop()
    client = _defaults.get(loop)
    if client is None:
        client = _defaults[loop] = Client()
    return client


@dataclass
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int | None
    pid: int = 0
    signal: int | None = None
    truncated_bytes: int = 0
    duration_ms: float = 0.0
    denials: list[m.ExecDenial] = field(default_factory=list)
    """Execs the sandbox's exec policy refused while the command ran (path, sha256, rule, audit_seq)."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class FileInfo:
    path: str
    name: str
    type: str
    size: int
    mode: int
    mtime: float
    target: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _file_info(e: dict[str, Any]) -> FileInfo:
    return FileInfo(path=e["path"], name=e["name"], type=e["type"], size=e["size"], mode=e["mode"],
                    mtime=e["mtime"], target=e.get("target"), raw=e)


async def _call(cb: Callback | None, data: str) -> None:
    if cb is None:
        return
    r = cb(data)
    if isinstance(r, Awaitable):
        await r


class AsyncCommandHandle:
    """A running command: wait for it, send it input, or kill it."""

    def __init__(self, sandbox: AsyncSandbox, pid: int, ws: Any = None):
        self.sandbox = sandbox
        self.pid = pid
        self._ws = ws

    async def wait(self, on_stdout: Callback | None = None, on_stderr: Callback | None = None) -> CommandResult:
        ws = self._ws
        if ws is None:
            ws = await self.sandbox._client.ws_connect(f"/sandboxes/{self.sandbox.id}/processes/{self.pid}/ws")
            await _expect_started(ws)
        self._ws = None
        return await _collect(ws, self.pid, on_stdout, on_stderr)

    async def kill(self, signal: int = 9) -> None:
        await self.sandbox._client.json("POST", f"/sandboxes/{self.sandbox.id}/processes/{self.pid}/signal",
                                        json={"signal": signal})

    async def send_stdin(self, data: str | bytes, eof: bool = False) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        if self._ws is not None:
            await self._ws.send(json.dumps({"type": "stdin", "data": base64.b64encode(text.encode()).decode()}))
            if eof:
                await self._ws.send(json.dumps({"type": "close_stdin"}))
            return
        await self.sandbox._client.json("POST", f"/sandboxes/{self.sandbox.id}/processes/{self.pid}/stdin",
                                        json={"data": text, "eof": eof})


async def _expect_started(ws: Any) -> int:
    msg = json.loads(await ws.recv())
    if msg.get("type") == "error":
        raise errors.from_body(400, {"error": msg})
    return int(msg["pid"])


async def _collect(ws: Any, pid: int, on_stdout: Callback | None, on_stderr: Callback | None) -> CommandResult:
    out: list[str] = []
    err: list[str] = []
    try:
        async for raw in ws:
            msg = json.loads(raw)
            t = msg.get("type")
            if t in ("stdout", "stderr"):
                text = base64.b64decode(msg["data"]).decode(errors="replace")
                (out if t == "stdout" else err).append(text)
                await _call(on_stdout if t == "stdout" else on_stderr, text)
            elif t == "exit":
                res = CommandResult("".join(out), "".join(err), msg.get("exit_code"), pid, msg.get("signal"))
                if msg.get("timed_out"):
                    raise errors.CommandTimeoutError(f"command {pid} timed out and was killed",
                                                     details={"stdout": res.stdout[-4096:], "stderr": res.stderr[-4096:]})
                return res
            elif t == "error":
                raise errors.from_body(400, {"error": msg})
    finally:
        await ws.close()
    raise errors.AgentError(f"the stream of command {pid} ended without an exit status")


def exec_body(cmd: str | list[str], **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"cmd": cmd} if isinstance(cmd, str) else {"argv": list(cmd)}
    body.update(env=kw.get("env") or {}, cwd=kw.get("cwd"), user=kw.get("user"), timeout_s=kw.get("timeout_s"),
                stdin=kw.get("stdin"), tag=kw.get("tag"))
    return body


def exec_result(r: dict[str, Any], timeout_s: float | None) -> CommandResult:
    res = CommandResult(r["stdout"], r["stderr"], r["exit_code"], r["pid"], r.get("signal"),
                        r.get("truncated_bytes", 0), r.get("duration_ms", 0.0),
                        [m.ExecDenial.model_validate(d) for d in r.get("denials") or ()])
    if r.get("timed_out"):
        raise errors.CommandTimeoutError(f"command timed out after {timeout_s}s and was killed",
                                         details={"stdout": res.stdout[-4096:], "stderr": res.stderr[-4096:]})
    return res


class AsyncAudit:
    """The audit log: of one sandbox (``sb.audit``) or of everything (``AsyncAudit(client)``)."""

    def __init__(self, client: Client, target: str | None = None):
        self._client = client
        self._target = target

    def _params(self, **kw: Any) -> dict[str, Any]:
        params = {k: v for k, v in kw.items() if v is not None}
        if self._target:
            params["target"] = self._target
        return params

    async def list(self, kind: str | None = None, since: float | None = None, until: float | None = None,
                   after: int = 0, limit: int = 1000) -> list[m.AuditRecord]:
        """Records, oldest first. ``kind``: an action such as ``exec.decision``, or a prefix ending in '.'."""
        r = await self._client.json("GET", "/audit", params=self._params(kind=kind, since=since, until=until,
                                                                         after=after, limit=limit))
        return [m.AuditRecord.model_validate(x) for x in r["records"]]

    async def stream(self, kind: str | None = None, after: int | None = None) -> AsyncGenerator[m.AuditRecord, None]:
        """Records as they are written (from now, or after seq ``after``), until the caller stops."""
        async with self._client.stream("GET", "/audit/stream", params=self._params(kind=kind, after=after),
                                       timeout=httpx.Timeout(10.0, read=None)) as r:
            async for line in r.aiter_lines():
                if line.strip():
                    yield m.AuditRecord.model_validate_json(line)

    async def verify(self) -> m.AuditVerify:
        return m.AuditVerify.model_validate(await self._client.json("GET", "/audit/verify"))


class AsyncCommands:
    def __init__(self, sandbox: AsyncSandbox):
        self._sb = sandbox

    async def run(self, cmd: str | list[str], *, background: bool = False, env: dict[str, str] | None = None,
                  cwd: str | None = None, user: str | None = None, timeout_s: float | None = 60,
                  stdin: str | None = None, on_stdout: Callback | None = None,
                  on_stderr: Callback | None = None, tag: str | None = None) -> Any:
        """Run a command. A non-zero exit is a result (``exit_code``), not an exception.

        With ``background=True`` returns an AsyncCommandHandle at once; with callbacks, output is
        streamed to them as it comes. ``timeout_s=None`` waits forever.
        """
        body = exec_body(cmd, env=env, cwd=cwd, user=user, timeout_s=timeout_s, stdin=stdin, tag=tag)
        sb = self._sb
        if background:
            r = await sb._client.json("POST", f"/sandboxes/{sb.id}/exec", json={**body, "background": True})
            return AsyncCommandHandle(sb, int(r["pid"]))
        if on_stdout is None and on_stderr is None:
            return exec_result(await sb._client.json("POST", f"/sandboxes/{sb.id}/exec", json=body), timeout_s)
        ws = await sb._client.ws_connect(f"/sandboxes/{sb.id}/exec/ws")
        try:
            await ws.send(json.dumps({k: v for k, v in body.items() if k != "stdin"} | {"stdin": stdin}))
            pid = await _expect_started(ws)
            await ws.send(json.dumps({"type": "close_stdin"}))
        except BaseException:
            await ws.close()
            raise
        return await _collect(ws, pid, on_stdout, on_stderr)

    async def list(self) -> list[m.ProcessInfo]:
        r = await self._sb._client.json("GET", f"/sandboxes/{self._sb.id}/processes")
        return [m.ProcessInfo.model_validate(p) for p in r["processes"]]

    async def kill(self, pid: int, signal: int = 9) -> None:
        await AsyncCommandHandle(self._sb, pid).kill(signal)

    async def connect(self, pid: int) -> AsyncCommandHandle:
        return AsyncCommandHandle(self._sb, pid)

    async def send_stdin(self, pid: int, data: str | bytes, eof: bool = False) -> None:
        await AsyncCommandHandle(self._sb, pid).send_stdin(data, eof)


class AsyncPtyHandle:
    def __init__(self, ws: Any, pid: int):
        self._ws = ws
        self.pid = pid

    async def send(self, data: str | bytes) -> None:
        raw = data.encode() if isinstance(data, str) else data
        await self._ws.send(json.dumps({"type": "stdin", "data": base64.b64encode(raw).decode()}))

    async def resize(self, rows: int, cols: int) -> None:
        await self._ws.send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    async def kill(self, signal: int = 9) -> None:
        await self._ws.send(json.dumps({"type": "signal", "signal": signal}))

    async def output(self) -> AsyncIterator[bytes]:
        """Terminal output as it comes; ends when the process exits (see ``exit_code``)."""
        self.exit_code: int | None = None
        async for raw in self._ws:
            msg = json.loads(raw)
            if msg.get("type") in ("stdout", "stderr"):
                yield base64.b64decode(msg["data"])
            elif msg.get("type") == "exit":
                self.exit_code = msg.get("exit_code")
                break
            elif msg.get("type") == "error":
                raise errors.from_body(400, {"error": msg})

    async def close(self) -> None:
        await self._ws.close()


class AsyncPty:
    def __init__(self, sandbox: AsyncSandbox):
        self._sb = sandbox

    async def create(self, rows: int = 24, cols: int = 80, cmd: str | None = None,
                     env: dict[str, str] | None = None, cwd: str | None = None) -> AsyncPtyHandle:
        ws = await self._sb._client.ws_connect(f"/sandboxes/{self._sb.id}/exec/ws")
        shell = cmd or "if [ -x /bin/bash ]; then exec /bin/bash -i; else exec /bin/sh -i; fi"
        await ws.send(json.dumps({"cmd": shell, "env": env or {}, "cwd": cwd, "pty": {"rows": rows, "cols": cols}}))
        pid = await _expect_started(ws)
        return AsyncPtyHandle(ws, pid)


class AsyncFiles:
    def __init__(self, sandbox: AsyncSandbox):
        self._sb = sandbox

    def _p(self, suffix: str = "") -> str:
        return f"/sandboxes/{self._sb.id}/files{suffix}"

    async def read(self, path: str) -> bytes:
        r = await self._sb._client.request("GET", self._p(), params={"path": path})
        return r.content

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def stream(self, path: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        async with self._sb._client.stream("GET", self._p(), params={"path": path}) as r:
            async for chunk in r.aiter_bytes(chunk_size):
                yield chunk

    async def write(self, path: str, data: bytes | str | AsyncIterator[bytes], mode: int = 0o644) -> m.WriteResult:
        content: Any = data.encode() if isinstance(data, str) else data
        r = await self._sb._client.json("PUT", self._p(), params={"path": path, "mode": mode}, content=content)
        return m.WriteResult.model_validate(r)

    async def list(self, path: str, depth: int = 1) -> list[FileInfo]:
        r = await self._sb._client.json("GET", self._p("/list"), params={"path": path, "depth": depth})
        return [_file_info(e) for e in r["entries"]]

    async def stat(self, path: str) -> FileInfo:
        return _file_info(await self._sb._client.json("GET", self._p("/stat"), params={"path": path}))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
            return True
        except errors.FileNotFoundInSandboxError:
            return False

    async def mkdir(self, path: str, parents: bool = True) -> FileInfo:
        return _file_info(await self._sb._client.json("POST", self._p("/mkdir"), json={"path": path, "parents": parents}))

    async def remove(self, path: str, recursive: bool = True) -> None:
        await self._sb._client.request("DELETE", self._p(), params={"path": path, "recursive": recursive})

    async def rename(self, src: str, dst: str) -> FileInfo:
        return _file_info(await self._sb._client.json("POST", self._p("/rename"), json={"src": src, "dst": dst}))


class AsyncNetwork:
    """A networked sandbox's egress lists: ``await sb.network.update(allow=[...])`` applies to new
    connections (and DNS answers) at once."""

    def __init__(self, sb: AsyncSandbox):
        self._sb = sb

    @property
    def policy(self) -> NetworkPolicy | None:
        return self._sb.info.policy.network

    async def update(self, allow: list[str] | None = None, deny: list[str] | None = None) -> NetworkPolicy | None:
        body = m.NetworkUpdate(allow=allow, deny=deny).model_dump(mode="json", exclude_none=True)
        self._sb.info = m.SandboxInfo.model_validate(
            await self._sb._client.json("PUT", f"/sandboxes/{self._sb.id}/network", json=body))
        return self._sb.info.policy.network


class AsyncSandbox:
    """A Corral sandbox. Create with ``await AsyncSandbox.create(...)``; ``async with`` kills it on exit."""

    def __init__(self, info: m.SandboxInfo, client: Client):
        self.info = info
        self._client = client
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.pty = AsyncPty(self)
        self.audit = AsyncAudit(client, self.info.id)
        self.network = AsyncNetwork(self)

    @property
    def id(self) -> str:
        return self.info.id

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} {self.info.status}>"

    @classmethod
    async def create(cls, template: str = "base", timeout_s: int | None = None, *, client: Client | None = None,
                     **policy: Any) -> AsyncSandbox:
        """Create and start a sandbox. ``policy`` takes the other SandboxPolicy fields
        (resources, env, root, allow_weaker_isolation) and ``metadata``."""
        c = client or default_client()
        vols = policy.get("volumes")
        if isinstance(vols, dict):
            policy["volumes"] = {p: ({"name": v.name} if isinstance(v, m.VolumeInfo) else v) for p, v in vols.items()}
        snap = policy.pop("from_snapshot", None)
        if snap is not None:
            policy["snapshot"] = snap.id if isinstance(snap, m.SnapshotInfo) else str(snap)
        try:
            body = m.CreateSandboxRequest.model_validate({"template": template, "timeout_s": timeout_s, **policy})
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            raise errors.InvalidRequestError(
                f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}", details={"problems": len(e.errors())}
            ) from None
        r = await c.json("POST", "/sandboxes", json=body.model_dump(mode="json", exclude_unset=True))
        return cls(m.SandboxInfo.model_validate(r), c)

    @classmethod
    async def connect(cls, sandbox_id: str, *, client: Client | None = None) -> AsyncSandbox:
        c = client or default_client()
        return cls(m.SandboxInfo.model_validate(await c.json("GET", f"/sandboxes/{sandbox_id}")), c)

    @classmethod
    async def list(cls, *, client: Client | None = None) -> list[m.SandboxInfo]:
        c = client or default_client()
        return m.SandboxList.model_validate(await c.json("GET", "/sandboxes")).sandboxes

    async def refresh(self) -> m.SandboxInfo:
        self.info = m.SandboxInfo.model_validate(await self._client.json("GET", f"/sandboxes/{self.id}"))
        return self.info

    async def is_running(self) -> bool:
        return (await self.refresh()).status == "running"

    async def stop(self) -> m.SandboxInfo:
        self.info = m.SandboxInfo.model_validate(await self._client.json("POST", f"/sandboxes/{self.id}/stop"))
        return self.info

    async def start(self) -> m.SandboxInfo:
        self.info = m.SandboxInfo.model_validate(await self._client.json("POST", f"/sandboxes/{self.id}/start"))
        return self.info

    async def snapshot(self, name: str | None = None) -> m.SnapshotInfo:
        """Capture the sandbox's files (it is frozen for the moment it takes); fork with
        ``AsyncSandbox.create(from_snapshot=snap)``."""
        return m.SnapshotInfo.model_validate(
            await self._client.json("POST", f"/sandboxes/{self.id}/snapshots", json={"name": name}))

    async def pause(self, to_disk: bool = False) -> m.SandboxInfo:
        """Freeze the sandbox (zero CPU, memory kept); to_disk=True hibernates where the host can."""
        self.info = m.SandboxInfo.model_validate(
            await self._client.json("POST", f"/sandboxes/{self.id}/pause", json={"to_disk": to_disk}))
        return self.info

    async def resume(self) -> m.SandboxInfo:
        self.info = m.SandboxInfo.model_validate(await self._client.json("POST", f"/sandboxes/{self.id}/resume"))
        return self.info

    async def set_timeout(self, timeout_s: int | None = None, idle_timeout_s: int | None = None) -> m.SandboxInfo:
        """Extend the wall-clock timeout (counted from now) or change the idle timeout."""
        body = {k: v for k, v in (("timeout_s", timeout_s), ("idle_timeout_s", idle_timeout_s)) if v is not None}
        self.info = m.SandboxInfo.model_validate(await self._client.json("PATCH", f"/sandboxes/{self.id}", json=body))
        return self.info

    async def kill(self) -> None:
        """Stop and delete the sandbox and its files."""
        try:
            await self._client.request("DELETE", f"/sandboxes/{self.id}")
        except errors.SandboxNotFoundError:
            pass

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()


class AsyncSnapshots:
    """Snapshots of the daemon: list, get and delete (deletion is refused while one is in use)."""

    @staticmethod
    async def list(*, client: Client | None = None) -> list[m.SnapshotInfo]:
        c = client or default_client()
        return m.SnapshotList.model_validate(await c.json("GET", "/snapshots")).snapshots

    @staticmethod
    async def get(ref: str, *, client: Client | None = None) -> m.SnapshotInfo:
        c = client or default_client()
        return m.SnapshotInfo.model_validate(await c.json("GET", f"/snapshots/{ref}"))

    @staticmethod
    async def delete(ref: str | m.SnapshotInfo, *, client: Client | None = None) -> None:
        c = client or default_client()
        await c.request("DELETE", f"/snapshots/{ref.id if isinstance(ref, m.SnapshotInfo) else ref}")


class AsyncVolume:
    """Named persistent volumes: attach with ``AsyncSandbox.create(volumes={"/cache": vol})``."""

    @staticmethod
    async def create(name: str, size_mib: int = 1024, *, client: Client | None = None) -> m.VolumeInfo:
        c = client or default_client()
        return m.VolumeInfo.model_validate(await c.json("POST", "/volumes", json={"name": name, "size_mib": size_mib}))

    @staticmethod
    async def list(*, client: Client | None = None) -> list[m.VolumeInfo]:
        c = client or default_client()
        return m.VolumeList.model_validate(await c.json("GET", "/volumes")).volumes

    @staticmethod
    async def get(name: str, *, client: Client | None = None) -> m.VolumeInfo:
        c = client or default_client()
        return m.VolumeInfo.model_validate(await c.json("GET", f"/volumes/{name}"))

    @staticmethod
    async def delete(name: str | m.VolumeInfo, *, client: Client | None = None) -> None:
        c = client or default_client()
        await c.request("DELETE", f"/volumes/{name.name if isinstance(name, m.VolumeInfo) else name}")


class AsyncSecrets:
    """Credentials the egress proxy injects: the value goes in once and never comes back out.

    ``await AsyncSecrets.set("github", token, hosts=["github.com", "api.github.com"], env="GITHUB_TOKEN")``;
    sandboxes name it with ``secrets=["github"]`` and see only its placeholder."""

    @staticmethod
    async def set(name: str, value: str, hosts: list[str], *, header: str | None = None, template: str | None = None,
                  basic_username: str | None = None, placeholder_headers: list[str] | None = None,
                  env: str | None = None, allow_requests: list[str] | None = None,
                  client: Client | None = None) -> m.SecretInfo:
        """Injection: a header (default ``Authorization: Bearer {value}``; ``header``/``template``),
        basic auth (``basic_username``), or placeholder substitution in ``placeholder_headers``.
        ``allow_requests=["GET /repos/org/*"]`` limits what the credential may be used for."""
        if sum(x is not None for x in (basic_username, placeholder_headers)) + (header is not None or
                                                                               template is not None) > 1:
            raise errors.InvalidRequestError("choose one injection: header/template, basic_username or "
                                             "placeholder_headers")
        injection: dict[str, Any]
        if basic_username is not None:
            injection = {"kind": "basic", "username": basic_username}
        elif placeholder_headers is not None:
            injection = {"kind": "placeholder", "headers": placeholder_headers}
        else:
            injection = {"kind": "header", **({"header": header} if header else {}),
                         **({"template": template} if template else {})}
        c = client or default_client()
        body = {"value": value, "hosts": hosts, "injection": injection, "env": env,
                "allow_requests": allow_requests or []}
        return m.SecretInfo.model_validate(await c.json("PUT", f"/secrets/{name}", json=body))

    @staticmethod
    async def list(*, client: Client | None = None) -> list[m.SecretInfo]:
        c = client or default_client()
        return m.SecretList.model_validate(await c.json("GET", "/secrets")).secrets

    @staticmethod
    async def delete(name: str, *, client: Client | None = None) -> None:
        c = client or default_client()
        await c.request("DELETE", f"/secrets/{name}")


async def wait_ready(client: Client, timeout_s: float = 30.0) -> m.Health:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return m.Health.model_validate(await client.json("GET", "/health"))
        except errors.DaemonUnreachableError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)
