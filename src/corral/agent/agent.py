"""Corral's in-sandbox agent: PID 1 of every sandbox. Stdlib only.

It runs commands (argv or shell string, env, cwd, user, stdin, PTY, signals, background processes
that can be listed and re-attached) and serves the files API. It reaps every zombie in the sandbox.

It holds no secret and no privilege beyond the sandbox's own: the daemon treats everything it says
as untrusted. It listens on a socket the daemon created on the host and passed in as fd 3; that
socket's path is not mounted in the sandbox, so no process inside can reach the daemon through it.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import fcntl
import os
import pty
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol as P  # noqa: E402  (the agent ships as loose files, not as a package)

LISTEN_FD = 3
REPLAY_BYTES = 4 << 20  # per stream, for re-attaching to a background process
DRAIN_AFTER_EXIT_S = 0.2  # a command's orphaned children may keep its pipes open
_AGENT_ENV_DROP = ("PYTHONHOME", "PYTHONDONTWRITEBYTECODE", "CORRAL_SANDBOX_ID")


class OpError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _oserror(e: OSError, path: str = "") -> OpError:
    where = f" {path!r}" if path else ""
    if e.errno == errno.ENOENT:
        return OpError("FileNotFound", f"no such file or directory{where}")
    if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
        return OpError("FileConflict", f"{os.strerror(e.errno or 0)}{where}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OpError("PermissionDenied", f"{os.strerror(e.errno or 0)}{where}")
    return OpError("InvalidRequest", f"{os.strerror(e.errno or 0)}{where}")


def check_path(path: Any) -> str:
    try:
        return P.check_path(path)
    except ValueError as e:
        raise OpError("InvalidPath", str(e)) from None


class Proc:
    def __init__(self, pid: int, argv: list[str], tag: str | None, pty_fd: int | None):
        self.pid = pid
        self.argv = argv
        self.tag = tag
        self.pty_fd = pty_fd
        self.started = time.time()
        self.stdin_fd: int | None = None
        self.out: dict[bytes, bytearray] = {P.STDOUT: bytearray(), P.STDERR: bytearray()}
        self.dropped: dict[bytes, int] = {P.STDOUT: 0, P.STDERR: 0}
        self.open_streams = 0
        self.status: int | None = None
        self.exit_event: dict[str, Any] | None = None
        self.finished = asyncio.Event()
        self.subscribers: set[asyncio.Queue[tuple[bytes, bytes]]] = set()
        self.timed_out = False

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid, "argv": self.argv, "tag": self.tag, "started_at": self.started,
                "running": self.exit_event is None, "pty": self.pty_fd is not None,
                "exit_code": None if self.exit_event is None else self.exit_event["exit_code"]}

    def feed(self, kind: bytes, data: bytes) -> None:
        buf = self.out[kind]
        buf += data
        if len(buf) > REPLAY_BYTES:
            cut = len(buf) - REPLAY_BYTES
            del buf[:cut]
            self.dropped[kind] += cut
        for q in self.subscribers:
            q.put_nowait((kind, data))


class Agent:
    def __init__(self) -> None:
        self.procs: dict[int, Proc] = {}
        self.env = {k: v for k, v in os.environ.items() if k not in _AGENT_ENV_DROP}
        self.shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"

    # ---- process management -------------------------------------------------------------
    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.get(pid)
            if proc is not None and proc.status is None:
                proc.status = status
                asyncio.get_running_loop().create_task(self._finish(proc))

    async def _finish(self, proc: Proc) -> None:
        deadline = time.monotonic() + DRAIN_AFTER_EXIT_S
        while proc.open_streams > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        loop = asyncio.get_running_loop()
        if proc.open_streams > 0:
            for fd in list(getattr(proc, "_fds", ())):
                self._close_stream(proc, fd, loop)
        status = proc.status or 0
        if os.WIFSIGNALED(status):
            code, sig = 128 + os.WTERMSIG(status), os.WTERMSIG(status)
        else:
            code, sig = os.WEXITSTATUS(status), None
        proc.exit_event = {"event": "exit", "exit_code": code, "signal": sig, "timed_out": proc.timed_out,
                           "dropped_stdout": proc.dropped[P.STDOUT], "dropped_stderr": proc.dropped[P.STDERR]}
        if proc.stdin_fd is not None:
            _close_quietly(proc.stdin_fd)
            proc.stdin_fd = None
        for q in proc.subscribers:
            q.put_nowait((P.JSON, b""))
        proc.finished.set()
        # Keep finished processes listable for a while; drop the oldest beyond 256.
        done = [p for p in self.procs.values() if p.exit_event is not None]
        for old in sorted(done, key=lambda p: p.started)[:-256]:
            self.procs.pop(old.pid, None)

    def _close_stream(self, proc: Proc, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        fds = getattr(proc, "_fds", set())
        if fd in fds:
            fds.discard(fd)
            loop.remove_reader(fd)
            if fd != proc.pty_fd:
                _close_quietly(fd)
            proc.open_streams -= 1

    def _watch(self, proc: Proc, fd: int, kind: bytes) -> None:
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        proc.open_streams += 1
        fds: set[int] = getattr(proc, "_fds", set())
        fds.add(fd)
        proc._fds = fds  # type: ignore[attr-defined]

        def readable() -> None:
            try:
                data = os.read(fd, P.CHUNK)
            except BlockingIOError:
                return
            except OSError:  # EIO: the PTY's other side closed
                data = b""
            if data:
                proc.feed(kind, data)
            else:
                self._close_stream(proc, fd, loop)

        loop.add_reader(fd, readable)

    def resolve_user(self, user: Any) -> tuple[int, int, str]:
        if user is None or user == "" or user == "root" or user == 0:
            return 0, 0, "/root"
        try:
            with open("/etc/passwd") as f:
                for line in f:
                    parts = line.rstrip("\n").split(":")
                    if len(parts) >= 6 and (parts[0] == str(user) or parts[2] == str(user)):
                        return int(parts[2]), int(parts[3]), parts[5]
        except OSError:
            pass
        if isinstance(user, int) or (isinstance(user, str) and user.isdigit()):
            return int(user), int(user), "/"
        raise OpError("InvalidRequest", f"unknown user {user!r} in this sandbox")

    def spawn(self, req: dict[str, Any]) -> Proc:
        argv = req.get("argv")
        cmd = req.get("cmd")
        if argv is None and isinstance(cmd, str):
            argv = [self.shell, "-c", cmd]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise OpError("InvalidRequest", "give either cmd (a string) or argv (a non-empty list of strings)")
        uid, gid, home = self.resolve_user(req.get("user"))
        env = dict(self.env)
        env["HOME"] = home
        extra = req.get("env") or {}
        if not isinstance(extra, dict):
            raise OpError("InvalidRequest", "env must be an object of strings")
        env.update({str(k): str(v) for k, v in extra.items()})
        cwd = req.get("cwd") or ("/workspace" if os.path.isdir("/workspace") else home if os.path.isdir(home) else "/")
        if not os.path.isdir(cwd):
            raise OpError("InvalidRequest", f"working directory {cwd!r} does not exist")
        term = req.get("pty")
        pty_fd = None
        kwargs: dict[str, Any] = {"cwd": cwd, "env": env, "start_new_session": True, "close_fds": True,
                                  "restore_signals": True}
        if uid != 0 or gid != 0:
            kwargs.update(user=uid, group=gid, extra_groups=[])

        try:
            if term:
                pty_fd, slave = pty.openpty()
                _set_winsize(pty_fd, int(term.get("rows", 24)), int(term.get("cols", 80)))
                env.setdefault("TERM", "xterm-256color")
                popen = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                         preexec_fn=_make_ctty, **{k: v for k, v in kwargs.items()
                                                                  if k != "start_new_session"})
                os.close(slave)
            else:
                popen = subprocess.Popen(argv, stdin=subprocess.PIPE if req.get("stdin") else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
        except FileNotFoundError:
            raise OpError("InvalidRequest", f"command not found: {argv[0]}") from None
        except PermissionError as e:
            raise OpError("InvalidRequest", f"cannot execute {argv[0]}: {e.strerror}") from None
        # The agent reaps with waitpid(-1); keep subprocess from reaping behind our back.
        popen.returncode = 0
        proc = Proc(popen.pid, argv, req.get("tag"), pty_fd)
        self.procs[proc.pid] = proc
        if pty_fd is not None:
            proc.stdin_fd = pty_fd
            self._watch(proc, pty_fd, P.STDOUT)
        else:
            assert popen.stdout is not None and popen.stderr is not None
            if popen.stdin is not None:
                proc.stdin_fd = os.dup(popen.stdin.fileno())
                popen.stdin.close()
                os.set_blocking(proc.stdin_fd, True)
            self._watch(proc, os.dup(popen.stdout.fileno()), P.STDOUT)
            self._watch(proc, os.dup(popen.stderr.fileno()), P.STDERR)
            popen.stdout.close()
            popen.stderr.close()
        timeout = req.get("timeout_s")
        if timeout:
            asyncio.get_running_loop().call_later(float(timeout), self._timeout, proc)
        return proc

    def _timeout(self, proc: Proc) -> None:
        if proc.exit_event is None:
            proc.timed_out = True
            self.signal(proc, signal.SIGKILL)

    def signal(self, proc: Proc, sig: int) -> None:
        if proc.exit_event is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass

    def get(self, pid: Any) -> Proc:
        proc = self.procs.get(pid) if isinstance(pid, int) else None
        if proc is None:
            raise OpError("ProcessNotFound", f"no process with pid {pid} started by the agent")
        return proc

    # ---- connections ---------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            kind, payload = await read_frame(reader)
            if kind != P.JSON:
                raise OpError("InvalidRequest", "the first frame must be a JSON request")
            req = P.decode_json(payload)
            op = req.get("op")
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
            if handler is None:
                raise OpError("InvalidRequest", f"unknown op {op!r}")
            await handler(req, reader, writer)
        except OpError as e:
            await _send(writer, P.encode_json({"ok": False, "code": e.code, "message": e.message}))
        except (asyncio.IncompleteReadError, ConnectionError, P.ProtocolError):
            pass
        except Exception as e:  # the agent must survive any bad request
            try:
                await _send(writer, P.encode_json({"ok": False, "code": "AgentError", "message": repr(e)[:500]}))
            except Exception:
                pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def op_ping(self, req: dict[str, Any], reader: Any, writer: asyncio.StreamWriter) -> None:
        await _send(writer, P.encode_json({"ok": True, "version": P.VERSION, "pid": os.getpid(),
                                           "processes": len(self.procs)}))

    async def op_exec(self, req: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proc = self.spawn(req)
        await _send(writer, P.encode_json({"ok": True, "pid": proc.pid}))
        if req.get("background") and not req.get("stream"):
            return
        await self._stream(proc, reader, writer, replay=False)

    async def op_attach(self, req: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proc = self.get(req.get("pid"))
        await _send(writer, P.encode_json({"ok": True, "pid": proc.pid}))
        await self._stream(proc, reader, writer, replay=bool(req.get("replay", True)))

    async def _stream(self, proc: Proc, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      replay: bool) -> None:
        q: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
        if replay:
            for kind in (P.STDOUT, P.STDERR):
                data = bytes(proc.out[kind])
                for i in range(0, len(data), P.CHUNK):
                    writer.write(P.encode(kind, data[i:i + P.CHUNK]))
        if proc.exit_event is None:
            proc.subscribers.add(q)
        input_task = asyncio.get_running_loop().create_task(self._client_input(proc, reader))
        try:
            while proc.exit_event is None or not q.empty():
                kind, data = await q.get()
                if kind == P.JSON:
                    break
                writer.write(P.encode(kind, data))
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
            writer.write(P.encode_json(proc.exit_event or {}))
            await writer.drain()
        finally:
            proc.subscribers.discard(q)
            input_task.cancel()

    async def _client_input(self, proc: Proc, reader: asyncio.StreamReader) -> None:
        """Stdin bytes and control messages sent by the daemon while a command runs."""
        while True:
            kind, payload = await read_frame(reader)
            if kind == P.STDIN:
                self._write_stdin(proc, payload)
            elif kind == P.JSON:
                self._control(proc, P.decode_json(payload))

    def _control(self, proc: Proc, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "close_stdin":
            if proc.stdin_fd is not None and proc.pty_fd is None:
                _close_quietly(proc.stdin_fd)
                proc.stdin_fd = None
        elif op == "signal":
            self.signal(proc, int(msg.get("signal", signal.SIGTERM)))
        elif op == "resize" and proc.pty_fd is not None:
            _set_winsize(proc.pty_fd, int(msg.get("rows", 24)), int(msg.get("cols", 80)))
            try:
                os.killpg(proc.pid, signal.SIGWINCH)
            except OSError:
                pass

    def _write_stdin(self, proc: Proc, data: bytes) -> None:
        if proc.stdin_fd is None:
            return
        try:
            os.write(proc.stdin_fd, data) if proc.pty_fd is None else _write_all_nonblocking(proc.stdin_fd, data)
        except BrokenPipeError:
            pass

    async def op_processes(self, req: dict[str, Any], reader: Any, writer: asyncio.StreamWriter) -> None:
        await _send(writer, P.encode_json({"ok": True, "processes": [p.info() for p in self.procs.values()]}))

    async def op_signal(self, req: dict[str, Any], reader: Any, writer: asyncio.StreamWriter) -> None:
        proc = self.get(req.get("pid"))
        self.signal(proc, int(req.get("signal", signal.SIGKILL)))
        await _send(writer, P.encode_json({"ok": True}))

    async def op_stdin(self, req: dict[str, Any], reader: Any, writer: asyncio.StreamWriter) -> None:
        proc = self.get(req.get("pid"))
        if req.get("data"):
            self._write_stdin(proc, base64.b64decode(req["data"]))
        if req.get("eof"):
            self._control(proc, {"op": "close_stdin"})
        await _send(writer, P.encode_json({"ok": True}))

    async def op_resize(self, req: dict[str, Any], reader: Any, writer: asyncio.StreamWriter) -> None:
        self._control(self.get(req.get("pid")), {"op": "resize", "rows": req.get("rows"), "cols": req.get("cols")})
        await _send(writer, P.encode_json({"ok": True}))

    # ---- files -------------------------------------------------------------------------
    async def op_read(self, req: dict[str, Any], reader: Any, writer: asyncio.StreamWriter) -> None:
        path = check_path(req.get("path"))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as e:
            raise _oserror(e, path) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OpError("FileConflict", f"{path!r} is not a regular file")
            limit = req.get("max_bytes")
            if isinstance(limit, int) and st.st_size > limit:
                raise OpError("PayloadTooLarge", f"{path!r} is {st.st_size} bytes, over the limit of {limit}")
            await _send(writer, P.encode_json({"ok": True, "size": st.st_size}))
            os.set_blocking(fd, True)
            while True:
                chunk = os.read(fd, P.CHUNK)
                if not chunk:
                    break
                writer.write(P.encode(P.DATA, chunk))
                await writer.drain()
            await _send(writer, P.encode_json({"event": "eof"}))
        finally:
            os.close(fd)

    async def op_write(self, req: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = check_path(req.get("path"))
        parent, name = os.path.split(path.rstrip("/"))
        if not name:
            raise OpError("InvalidPath", "cannot write to '/'")
        try:
            os.makedirs(parent or "/", exist_ok=True)
        except OSError as e:
            raise _oserror(e, parent) from None
        if os.path.isdir(path) and not os.path.islink(path):
            raise OpError("FileConflict", f"{path!r} is a directory")
        mode = int(req.get("mode", 0o644)) & 0o7777
        tmp = os.path.join(parent or "/", f".{name}.corral-{os.getpid()}-{time.monotonic_ns()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        except OSError as e:
            raise _oserror(e, path) from None
        size = 0
        try:
            await _send(writer, P.encode_json({"ok": True}))
            while True:
                kind, payload = await read_frame(reader)
                if kind == P.DATA:
                    mv = memoryview(payload)
                    while mv:
                        n = os.write(fd, mv)
                        mv = mv[n:]
                    size += len(payload)
                elif kind == P.JSON and P.decode_json(payload).get("op") == "end":
                    break
                else:
                    raise OpError("InvalidRequest", "expected file data or an end message")
            os.fchmod(fd, mode)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, path)
            dfd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        await _send(writer, P.encode_json({"ok": True, "size": size, "path": path}))

    async def op_list(self, req: dict[str, Any], reader: Any, writer: asyncio.StreamWriter) -> None:
        path = check_path(req.get("path"))
        depth = max(1, min(int(req.get("depth", 1)), 16))
        out: list[dict[str, Any]] = []

        def walk(d: str, level: int) -> None:
            try:
                it = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError as e:
                raise _oserror(e, d) from None
            for ent in it:
                info = _entry(ent.path)
                out.append(info)
                if info["type"] == "dir" and level < depth:
                    walk(ent.path, level + 1)
                if len(out) > 100_000:
                    raise OpError("PayloadTooLarge", "more than 100000 entries; list a smaller depth")

        if not os.path.isdir(path):
            if os.path.lexists(path):
                raise OpError("FileConflict", f"{path!r} is not a directory")
            raise OpError("FileNotFound", f"no such directory {path!r}")
        walk(path, 1)
        await _send(writer, P.encode_json({"ok": True, "entries": out}))

    async def op_stat(self, req: dict[str, Any], reader: Any, writer: asyncio.StreamWriter) -> None:
        path = check_path(req.get("path"))
        try:
            info = _entry(path)
        except OSError as e:
            raise _oserror(e, path) from None
        await _send(writer, P.encode_json({"ok": True, "entry": info}))

    async def op_mkdir(self, req: dict[str, Any], reader: Any, writer: asyncio.StreamWriter) -> None:
        path = check_path(req.get("path"))
        try:
            if req.get("parents", True):
                os.makedirs(path, exist_ok=True)
            else:
                os.mkdir(path)
        except OSError as e:
            raise _oserror(e, path) from None
        await _send(writer, P.encode_json({"ok": True, "entry": _entry(path)}))

    async def op_remove(self, req: dict[str, Any], reader: Any, writer: asyncio.StreamWriter) -> None:
        path = check_path(req.get("path"))
        if path == "/":
            raise OpError("InvalidPath", "refusing to remove '/'")
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                if req.get("recursive", True):
                    shutil.rmtree(path)  # does not follow symlinks
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as e:
            raise _oserror(e, path) from None
        await _send(writer, P.encode_json({"ok": True}))

    async def op_rename(self, req: dict[str, Any], reader: Any, writer: asyncio.StreamWriter) -> None:
        src, dst = check_path(req.get("src")), check_path(req.get("dst"))
        try:
            os.rename(src, dst)
        except OSError as e:
            raise _oserror(e, src) from None
        await _send(writer, P.encode_json({"ok": True, "entry": _entry(dst)}))


def _entry(path: str) -> dict[str, Any]:
    st = os.lstat(path)
    mode = st.st_mode
    kind = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
            else "symlink" if stat.S_ISLNK(mode) else "other")
    info: dict[str, Any] = {"path": path, "name": os.path.basename(path) or "/", "type": kind,
                            "size": st.st_size, "mode": stat.S_IMODE(mode), "mtime": st.st_mtime,
                            "uid": st.st_uid, "gid": st.st_gid}
    if kind == "symlink":
        info["target"] = os.readlink(path)
    return info


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind, length = P.parse_header(await reader.readexactly(P.HEADER.size))
    return kind, (await reader.readexactly(length) if length else b"")


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _write_all_nonblocking(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        try:
            n = os.write(fd, mv)
            mv = mv[n:]
        except BlockingIOError:
            time.sleep(0.001)


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", max(1, rows), max(1, cols), 0, 0))


def _make_ctty() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _harden() -> None:
    # Not dumpable: other processes in the sandbox (same uid) cannot open /proc/1/fd/*,
    # /proc/1/environ or /proc/1/mem.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception as e:
        print(f"corral-agent: cannot clear dumpable: {e}", file=sys.stderr)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


async def main() -> None:
    agent = Agent()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGCHLD, agent.reap)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, lambda: None)  # PID 1 stops only when the runtime kills it
    sock = socket.socket(fileno=LISTEN_FD)
    sock.setblocking(False)
    server = await asyncio.start_unix_server(agent.handle, sock=sock, limit=P.MAX_FRAME + 64)
    _harden()
    agent.reap()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
