"""Daemon-side client of the in-sandbox agent. Everything the agent says is untrusted input."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from collections.abc import AsyncIterator
from typing import Any

from corral import errors
from corral.agent import protocol as P

_CODES: dict[str, type[errors.CorralError]] = {
    "InvalidPath": errors.InvalidPathError,
    "InvalidRequest": errors.InvalidRequestError,
    "FileNotFound": errors.FileNotFoundInSandboxError,
    "FileConflict": errors.FileConflictError,
    "PermissionDenied": errors.InvalidRequestError,
    "ProcessNotFound": errors.ProcessNotFoundError,
    "PayloadTooLarge": errors.PayloadTooLargeError,
}


def _raise(reply: dict[str, Any]) -> None:
    cls = _CODES.get(str(reply.get("code")), errors.AgentError)
    raise cls(str(reply.get("message", "the agent refused the request"))[:1000])


class AgentConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def send_json(self, obj: dict[str, Any]) -> None:
        self.writer.write(P.encode_json(obj))
        await self.writer.drain()

    async def send(self, kind: bytes, data: bytes) -> None:
        for i in range(0, max(len(data), 1), P.CHUNK):
            self.writer.write(P.encode(kind, data[i:i + P.CHUNK]))
        await self.writer.drain()

    async def read_frame(self) -> tuple[bytes, bytes]:
        try:
            kind, length = P.parse_header(await self.reader.readexactly(P.HEADER.size))
            return kind, (await self.reader.readexactly(length) if length else b"")
        except (asyncio.IncompleteReadError, ConnectionError):
            raise errors.AgentError("the agent closed the connection (did the sandbox stop?)") from None
        except P.ProtocolError as e:
            raise errors.AgentError(f"the agent broke the protocol: {e}") from None

    async def read_json(self) -> dict[str, Any]:
        kind, payload = await self.read_frame()
        if kind != P.JSON:
            raise errors.AgentError("the agent sent data where a JSON reply was expected")
        try:
            return P.decode_json(payload)
        except P.ProtocolError as e:
            raise errors.AgentError(str(e)) from None

    async def reply(self) -> dict[str, Any]:
        r = await self.read_json()
        if not r.get("ok"):
            _raise(r)
        return r

    def close(self) -> None:
        self.writer.close()


class AgentClient:
    def __init__(self, socket_path: str, sandbox_id: str):
        self.socket_path = socket_path
        self.sandbox_id = sandbox_id

    async def connect(self, timeout_s: float = 10.0, wait: bool = False) -> AgentConnection:
        """Connect to the agent. The socket's directory may be writable by the sandbox (hibernatable
        sandboxes), so the path is opened O_PATH without following links and must be a socket: a link
        planted there cannot point the daemon at another socket on the host."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            fd = -1
            try:
                fd = os.open(self.socket_path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    raise errors.AgentError(f"sandbox {self.sandbox_id}: the agent's socket is not a socket")
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(f"/proc/self/fd/{fd}", limit=P.MAX_FRAME + 64),
                    max(0.01, deadline - loop.time()))
                return AgentConnection(reader, writer)
            except (TimeoutError, OSError) as e:
                if wait and loop.time() < deadline and isinstance(e, FileNotFoundError | ConnectionRefusedError):
                    await asyncio.sleep(0.002)
                    continue
                raise errors.SandboxNotRunningError(f"sandbox {self.sandbox_id} is not answering ({e})") from None
            finally:
                if fd >= 0:
                    os.close(fd)

    async def request(self, req: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        conn = await self.connect()
        try:
            await conn.send_json(req)
            return await asyncio.wait_for(conn.reply(), timeout_s)
        except TimeoutError:
            raise errors.AgentError(f"the agent did not answer {req.get('op')} in {timeout_s}s") from None
        finally:
            conn.close()

    async def ping(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Wait for the agent to listen (up to timeout_s) and answer."""
        conn = await self.connect(timeout_s, wait=True)
        try:
            await conn.send_json({"op": "ping"})
            return await asyncio.wait_for(conn.reply(), timeout_s)
        except TimeoutError:
            raise errors.AgentError(f"the agent did not answer ping in {timeout_s}s") from None
        finally:
            conn.close()

    async def exec_collect(self, req: dict[str, Any], max_output_bytes: int,
                           stdin: bytes | None = None) -> dict[str, Any]:
        """Run a command to completion, collecting output up to a cap (then truncating with a marker)."""
        conn = await self.connect()
        try:
            await conn.send_json({**req, "op": "exec", "stdin": stdin is not None})
            start = await conn.reply()
            if stdin is not None:
                if stdin:
                    await conn.send(P.STDIN, stdin)
                await conn.send_json({"op": "close_stdin"})
            out: dict[bytes, list[bytes]] = {P.STDOUT: [], P.STDERR: []}
            sizes = {P.STDOUT: 0, P.STDERR: 0}
            truncated = {P.STDOUT: 0, P.STDERR: 0}
            while True:
                kind, data = await conn.read_frame()
                if kind == P.JSON:
                    ev = P.decode_json(data)
                    break
                if kind in out:
                    room = max_output_bytes - sizes[kind]
                    if room > 0:
                        out[kind].append(data[:room])
                        sizes[kind] += min(len(data), room)
                    truncated[kind] += max(0, len(data) - max(room, 0))
            return {"pid": start.get("pid"), "stdout": b"".join(out[P.STDOUT]), "stderr": b"".join(out[P.STDERR]),
                    "exit_code": int(ev.get("exit_code", -1)), "signal": ev.get("signal"),
                    "timed_out": bool(ev.get("timed_out")),
                    "truncated_bytes": truncated[P.STDOUT] + truncated[P.STDERR]}
        finally:
            conn.close()

    async def exec_stream(self, req: dict[str, Any]) -> tuple[AgentConnection, dict[str, Any]]:
        conn = await self.connect()
        await conn.send_json({**req, "op": req.get("op", "exec"), "stream": True})
        try:
            start = await conn.reply()
        except BaseException:
            conn.close()
            raise
        return conn, start

    async def open_read(self, path: str, max_bytes: int) -> tuple[AgentConnection, int]:
        """Start reading a file: errors (missing, not a regular file, too large) surface here."""
        conn = await self.connect()
        try:
            await conn.send_json({"op": "read", "path": path, "max_bytes": max_bytes})
            reply = await conn.reply()
        except BaseException:
            conn.close()
            raise
        return conn, int(reply.get("size", 0))

    @staticmethod
    async def iter_read(conn: AgentConnection) -> AsyncIterator[bytes]:
        try:
            while True:
                kind, data = await conn.read_frame()
                if kind != P.DATA:
                    break
                yield data
        finally:
            conn.close()

    async def write_file(self, path: str, chunks: AsyncIterator[bytes], mode: int = 0o644) -> dict[str, Any]:
        conn = await self.connect()
        try:
            await conn.send_json({"op": "write", "path": path, "mode": mode})
            await conn.reply()
            async for chunk in chunks:
                if chunk:
                    await conn.send(P.DATA, chunk)
            await conn.send_json({"op": "end"})
            return await conn.reply()
        finally:
            conn.close()

    async def send_stdin(self, pid: int, data: bytes, eof: bool) -> None:
        await self.request({"op": "stdin", "pid": pid, "data": base64.b64encode(data).decode(), "eof": eof})
