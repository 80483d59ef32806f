"""Daemon-side client of the in-sandbox agent. Everything the agent says is untrusted input."""

from __future__ import annotations

import asyncio
import base64
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

    async def connect(self, timeout_s: float = 10.0) -> AgentConnection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path, limit=P.MAX_FRAME + 64), timeout_s)
        except (TimeoutError, OSError) as e:
            raise errors.SandboxNotRunningError(f"sandbox {self.sandbox_id} is not answering ({e})") from None
        return AgentConnection(reader, writer)

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
        return await self.request({"op": "ping"}, timeout_s)

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
