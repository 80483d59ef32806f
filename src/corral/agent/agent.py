"""Corral's in-sandbox agent: PID 1 of every sandbox. Stdlib only.

It runs commands (argv or shell string, env, cwd, user, stdin, PTY, signals, background processes
that can be listed and re-attached) and serves the files API. It reaps every zombie in the sandbox.

It holds no secret and no privilege beyond the sandbox's own: the daemon treats everything it says
as untrusted. It listens on a socket the daemon created on the host and passed in as fd 3; that
socket's path is not mounted in the sandbox, so no process inside can reach the daemon through it.

Threads, not asyncio: importing asyncio costs ~30 ms, which is most of a sandbox's start-up. One
thread accepts, one serves each connection, one reads every output stream (epoll), one reaps children.
"""

from __future__ import annotations

import binascii
import errno
import fcntl
import heapq
import os
import select
import signal
import socket
import stat
import struct
import sys
import termios
import threading
import time
from _queue import SimpleQueue  # the C queue: `import queue` pulls in more modules

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol as P  # the agent ships as loose files, not as a package

TYPE_CHECKING = False  # importing typing costs ~2 ms of every sandbox start; annotations are postponed
if TYPE_CHECKING:
    from typing import Any

LISTEN_FD = 3
REPLAY_BYTES = 4 << 20  # per stream, for re-attaching to a background process
DRAIN_AFTER_EXIT_S = 0.2  # a command's orphaned children may keep its pipes open
KEEP_FINISHED = 256
_AGENT_ENV_DROP = ("PYTHONHOME", "PYTHONDONTWRITEBYTECODE", "CORRAL_SANDBOX_ID", "CORRAL_AGENT_LISTEN")
LOCK = threading.Lock()  # guards every Proc and the process table
HARDENED = threading.Event()


def _import_subprocess() -> Any:
    import subprocess  # ~10 ms: imported in the background at start-up, see main()

    return subprocess


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


class Scheduler:
    """One thread for every timer (command timeouts, pipe drains): a thread per timer would count
    against the sandbox's pids.max and sleep there for the whole timeout."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.heap: list[tuple[float, int, Any, tuple[Any, ...]]] = []
        self.seq = 0

    def at(self, delay_s: float, fn: Any, *args: Any) -> None:
        with self.cv:
            self.seq += 1
            heapq.heappush(self.heap, (time.monotonic() + delay_s, self.seq, fn, args))
            self.cv.notify()

    def run(self) -> None:
        while True:
            with self.cv:
                while not self.heap:
                    self.cv.wait()
                due = self.heap[0][0] - time.monotonic()
                if due > 0:
                    self.cv.wait(due)
                    continue
                _, _, fn, args = heapq.heappop(self.heap)
            try:
                fn(*args)
            except Exception:
                pass


class Conn:
    """One daemon connection: blocking frame I/O on a socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.wlock = threading.Lock()

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("peer closed")
            buf += chunk
        return bytes(buf)

    def read_frame(self) -> tuple[bytes, bytes]:
        kind, length = P.parse_header(self.recv_exact(P.HEADER.size))
        return kind, (self.recv_exact(length) if length else b"")

    def send(self, data: bytes) -> None:
        with self.wlock:
            self.sock.sendall(data)

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send(P.encode_json(obj))


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
        self.subscribers: set[SimpleQueue[tuple[bytes, bytes] | None]] = set()
        self.timed_out = False

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid, "argv": self.argv, "tag": self.tag, "started_at": self.started,
                "running": self.exit_event is None, "pty": self.pty_fd is not None,
                "exit_code": None if self.exit_event is None else self.exit_event["exit_code"]}

    def feed(self, kind: bytes, data: bytes) -> None:  # with LOCK held
        buf = self.out[kind]
        buf += data
        if len(buf) > REPLAY_BYTES:
            cut = len(buf) - REPLAY_BYTES
            del buf[:cut]
            self.dropped[kind] += cut
        for q in self.subscribers:
            q.put((kind, data))


class Agent:
    def __init__(self) -> None:
        self.procs: dict[int, Proc] = {}
        self.early_exits: dict[int, int] = {}  # reaped before spawn() registered them
        self.children = threading.Event()
        self.timers = Scheduler()
        self.epoll = select.epoll()
        self.streams: dict[int, tuple[Proc, bytes]] = {}
        self.env = {k: v for k, v in os.environ.items() if k not in _AGENT_ENV_DROP}
        self.shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"

    # ---- process management -------------------------------------------------------------
    def reaper(self) -> None:
        while True:
            try:
                self._reap_one()
            except Exception:  # never let the reaper die: zombies would pile up
                time.sleep(0.01)

    def _reap_one(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self.children.wait()
                self.children.clear()
                continue
            except InterruptedError:
                continue
            with LOCK:
                proc = self.procs.get(pid)
                if proc is None:
                    self.early_exits[pid] = status
                    if len(self.early_exits) > 4096:  # orphans nobody will ask about
                        self.early_exits.pop(next(iter(self.early_exits)))
                    continue
                self._exited(proc, status)

    def _exited(self, proc: Proc, status: int) -> None:  # with LOCK held
        if proc.status is not None:
            return
        proc.status = status
        if proc.open_streams == 0:
            self._finish(proc)
            return
        self.timers.at(DRAIN_AFTER_EXIT_S, self._drain_timeout, proc)

    def _drain_timeout(self, proc: Proc) -> None:
        with LOCK:
            self._finish(proc)

    def _finish(self, proc: Proc) -> None:  # with LOCK held
        if proc.exit_event is not None:
            return
        status = proc.status or 0
        if os.WIFSIGNALED(status):
            code, sig = 128 + os.WTERMSIG(status), os.WTERMSIG(status)
        else:
            code, sig = os.WEXITSTATUS(status), None
        proc.exit_event = {"event": "exit", "exit_code": code, "signal": sig, "timed_out": proc.timed_out,
                           "dropped_stdout": proc.dropped[P.STDOUT], "dropped_stderr": proc.dropped[P.STDERR]}
        if proc.stdin_fd is not None and proc.stdin_fd != proc.pty_fd:
            _close_quietly(proc.stdin_fd)
        proc.stdin_fd = None
        if proc.pty_fd is not None:
            _close_quietly(proc.pty_fd)
        for q in proc.subscribers:
            q.put(None)
        done = [p for p in self.procs.values() if p.exit_event is not None]
        for old in sorted(done, key=lambda p: p.started)[:-KEEP_FINISHED]:
            self.procs.pop(old.pid, None)

    def io_loop(self) -> None:
        """One thread reads every command's output (epoll), feeding buffers and subscribers."""
        while True:
            try:
                events = self.epoll.poll()
            except InterruptedError:
                continue
            for fd, _mask in events:
                with LOCK:
                    entry = self.streams.get(fd)
                if entry is None:
                    continue
                proc, kind = entry
                try:
                    data = os.read(fd, P.CHUNK)
                except BlockingIOError:
                    continue
                except OSError:  # EIO: the PTY's other side closed
                    data = b""
                with LOCK:
                    if data:
                        proc.feed(kind, data)
                        continue
                    self.streams.pop(fd, None)
                    proc.open_streams -= 1
                    if proc.status is not None and proc.open_streams == 0:
                        self._finish(proc)
                self.epoll.unregister(fd)
                _close_quietly(fd)

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
        HARDENED.wait()  # no untrusted process may exist before the agent is non-dumpable
        subprocess = _import_subprocess()
        kwargs: dict[str, Any] = {"cwd": cwd, "env": env, "close_fds": True, "restore_signals": True}
        if uid != 0 or gid != 0:
            kwargs.update(user=uid, group=gid, extra_groups=[])
        pty_fd = None
        try:
            if term:
                import pty

                pty_fd, slave = pty.openpty()
                _set_winsize(pty_fd, int(term.get("rows", 24)), int(term.get("cols", 80)))
                env.setdefault("TERM", "xterm-256color")
                popen = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=_make_ctty,
                                         **kwargs)
                os.close(slave)
            else:
                popen = subprocess.Popen(argv, stdin=subprocess.PIPE if req.get("stdin") else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                         **kwargs)
        except FileNotFoundError:
            if pty_fd is not None:
                _close_quietly(pty_fd)
            raise OpError("InvalidRequest", f"command not found: {argv[0]}") from None
        except PermissionError as e:
            if pty_fd is not None:
                _close_quietly(pty_fd)
            raise OpError("InvalidRequest", f"cannot execute {argv[0]}: {e.strerror}") from None
        # The agent reaps with waitpid(-1); keep subprocess from reaping behind our back.
        popen.returncode = 0
        self.children.set()
        proc = Proc(popen.pid, argv, req.get("tag"), pty_fd)
        streams: list[tuple[int, bytes]] = []
        if pty_fd is not None:
            proc.stdin_fd = pty_fd
            streams.append((os.dup(pty_fd), P.STDOUT))
        else:
            assert popen.stdout is not None and popen.stderr is not None
            if popen.stdin is not None:
                proc.stdin_fd = os.dup(popen.stdin.fileno())
                popen.stdin.close()
            streams += [(os.dup(popen.stdout.fileno()), P.STDOUT), (os.dup(popen.stderr.fileno()), P.STDERR)]
            popen.stdout.close()
            popen.stderr.close()
        proc.open_streams = len(streams)
        with LOCK:
            self.procs[proc.pid] = proc
            early = self.early_exits.pop(proc.pid, None)
            if early is not None:
                self._exited(proc, early)
        for fd, kind in streams:
            os.set_blocking(fd, False)
            with LOCK:
                self.streams[fd] = (proc, kind)
            self.epoll.register(fd, select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR)
        timeout = req.get("timeout_s")
        if timeout:
            self.timers.at(float(timeout), self._timeout, proc)
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
    def handle(self, sock: socket.socket) -> None:
        conn = Conn(sock)
        try:
            kind, payload = conn.read_frame()
            if kind != P.JSON:
                raise OpError("InvalidRequest", "the first frame must be a JSON request")
            req = P.decode_json(payload)
            op = req.get("op")
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
            if handler is None:
                raise OpError("InvalidRequest", f"unknown op {op!r}")
            handler(req, conn)
        except OpError as e:
            _quietly(conn.send_json, {"ok": False, "code": e.code, "message": e.message})
        except (ConnectionError, P.ProtocolError, OSError):
            pass
        except Exception as e:  # the agent must survive any bad request
            _quietly(conn.send_json, {"ok": False, "code": "AgentError", "message": repr(e)[:500]})
        finally:
            _quietly(sock.close)

    def op_ping(self, req: dict[str, Any], conn: Conn) -> None:
        conn.send_json({"ok": True, "version": P.VERSION, "pid": os.getpid(), "processes": len(self.procs)})

    def op_exec(self, req: dict[str, Any], conn: Conn) -> None:
        proc = self.spawn(req)
        conn.send_json({"ok": True, "pid": proc.pid})
        if req.get("background") and not req.get("stream"):
            return
        # Replay: output produced between spawn and subscription is already in the buffer. A plain
        # collected exec sends nothing after its request: no input thread for it (~0.1 ms).
        self._stream(proc, conn, replay=True,
                     take_input=bool(req.get("stdin") or req.get("pty") or req.get("stream")))

    def op_attach(self, req: dict[str, Any], conn: Conn) -> None:
        proc = self.get(req.get("pid"))
        conn.send_json({"ok": True, "pid": proc.pid})
        self._stream(proc, conn, replay=bool(req.get("replay", True)))

    def _stream(self, proc: Proc, conn: Conn, replay: bool, take_input: bool = True) -> None:
        q: SimpleQueue[tuple[bytes, bytes] | None] = SimpleQueue()
        with LOCK:
            backlog = [(k, bytes(proc.out[k])) for k in (P.STDOUT, P.STDERR)] if replay else []
            if proc.exit_event is None:
                proc.subscribers.add(q)
            else:
                q.put(None)
        reader: threading.Thread | None = None
        if take_input:
            reader = threading.Thread(target=self._client_input, args=(proc, conn), daemon=True)
            try:
                reader.start()
            except RuntimeError:  # pids.max reached: stream output, but take no input
                reader = None
        try:
            for kind, data in backlog:
                for i in range(0, len(data), P.CHUNK):
                    conn.send(P.encode(kind, data[i:i + P.CHUNK]))
            while True:
                item = q.get()
                if item is None:
                    break
                conn.send(P.encode(*item))
            conn.send_json(proc.exit_event or {})
            # Let the daemon close first: closing with its late input (close_stdin, a signal) still
            # unread would reset the connection and could lose the exit event we just sent.
            conn.sock.shutdown(socket.SHUT_WR)
            if reader is not None:
                reader.join(timeout=10)
        finally:
            with LOCK:
                proc.subscribers.discard(q)

    def _client_input(self, proc: Proc, conn: Conn) -> None:
        """Stdin bytes and control messages sent by the daemon while a command runs."""
        try:
            while True:
                kind, payload = conn.read_frame()
                if kind == P.STDIN:
                    self._write_stdin(proc, payload)
                elif kind == P.JSON:
                    self._control(proc, P.decode_json(payload))
        except (ConnectionError, OSError, P.ProtocolError):
            return

    def _control(self, proc: Proc, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "close_stdin":
            with LOCK:
                fd, proc.stdin_fd = (proc.stdin_fd, None) if proc.pty_fd is None else (None, proc.stdin_fd)
            if fd is not None:
                _close_quietly(fd)
        elif op == "signal":
            self.signal(proc, int(msg.get("signal", signal.SIGTERM)))
        elif op == "resize" and proc.pty_fd is not None and proc.exit_event is None:
            _set_winsize(proc.pty_fd, int(msg.get("rows", 24)), int(msg.get("cols", 80)))
            try:
                os.killpg(os.getpgid(proc.pid), signal.SIGWINCH)
            except OSError:
                pass

    def _write_stdin(self, proc: Proc, data: bytes) -> None:
        fd = proc.stdin_fd
        if fd is None:
            return
        try:
            mv = memoryview(data)
            while mv:
                mv = mv[os.write(fd, mv):]
        except OSError:  # the reader went away
            pass

    def op_dumpable(self, req: dict[str, Any], conn: Conn) -> None:
        """Around a CRIU checkpoint: a non-dumpable agent restored by CRIU cannot be checkpointed again
        (its mm then belongs to the host's user namespace), so the daemon lifts the flag just before a
        dump and sets it again right after the restore."""
        _set_dumpable(bool(req.get("value")))
        conn.send_json({"ok": True})

    def op_processes(self, req: dict[str, Any], conn: Conn) -> None:
        with LOCK:
            procs = [p.info() for p in self.procs.values()]
        conn.send_json({"ok": True, "processes": procs})

    def op_signal(self, req: dict[str, Any], conn: Conn) -> None:
        self.signal(self.get(req.get("pid")), int(req.get("signal", signal.SIGKILL)))
        conn.send_json({"ok": True})

    def op_stdin(self, req: dict[str, Any], conn: Conn) -> None:
        proc = self.get(req.get("pid"))
        if req.get("data"):
            self._write_stdin(proc, binascii.a2b_base64(req["data"]))
        if req.get("eof"):
            self._control(proc, {"op": "close_stdin"})
        conn.send_json({"ok": True})

    def op_resize(self, req: dict[str, Any], conn: Conn) -> None:
        self._control(self.get(req.get("pid")), {"op": "resize", "rows": req.get("rows"), "cols": req.get("cols")})
        conn.send_json({"ok": True})

    # ---- files -------------------------------------------------------------------------
    def op_read(self, req: dict[str, Any], conn: Conn) -> None:
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
            conn.send_json({"ok": True, "size": st.st_size})
            os.set_blocking(fd, True)
            while True:
                chunk = os.read(fd, P.CHUNK)
                if not chunk:
                    break
                conn.send(P.encode(P.DATA, chunk))
            conn.send_json({"event": "eof"})
        finally:
            os.close(fd)

    def op_write(self, req: dict[str, Any], conn: Conn) -> None:
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
            conn.send_json({"ok": True})
            while True:
                kind, payload = conn.read_frame()
                if kind == P.DATA:
                    mv = memoryview(payload)
                    while mv:
                        mv = mv[os.write(fd, mv):]
                    size += len(payload)
                elif kind == P.JSON and P.decode_json(payload).get("op") == "end":
                    break
                else:
                    raise OpError("InvalidRequest", "expected file data or an end message")
            os.fchmod(fd, mode)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, path)  # atomic: readers see the old file or the whole new one
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
        conn.send_json({"ok": True, "size": size, "path": path})

    def op_list(self, req: dict[str, Any], conn: Conn) -> None:
        path = check_path(req.get("path"))
        depth = max(1, min(int(req.get("depth", 1)), 16))
        out: list[dict[str, Any]] = []

        def walk(d: str, level: int) -> None:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError as e:
                raise _oserror(e, d) from None
            for ent in entries:
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
        conn.send_json({"ok": True, "entries": out})

    def op_stat(self, req: dict[str, Any], conn: Conn) -> None:
        path = check_path(req.get("path"))
        try:
            info = _entry(path)
        except OSError as e:
            raise _oserror(e, path) from None
        conn.send_json({"ok": True, "entry": info})

    def op_mkdir(self, req: dict[str, Any], conn: Conn) -> None:
        path = check_path(req.get("path"))
        try:
            if req.get("parents", True):
                os.makedirs(path, exist_ok=True)
            else:
                os.mkdir(path)
        except OSError as e:
            raise _oserror(e, path) from None
        conn.send_json({"ok": True, "entry": _entry(path)})

    def op_remove(self, req: dict[str, Any], conn: Conn) -> None:
        path = check_path(req.get("path"))
        if path == "/":
            raise OpError("InvalidPath", "refusing to remove '/'")
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                if req.get("recursive", True):
                    import shutil

                    shutil.rmtree(path)  # does not follow symlinks
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as e:
            raise _oserror(e, path) from None
        conn.send_json({"ok": True})

    def op_rename(self, req: dict[str, Any], conn: Conn) -> None:
        src, dst = check_path(req.get("src")), check_path(req.get("dst"))
        try:
            os.rename(src, dst)
        except OSError as e:
            raise _oserror(e, src) from None
        conn.send_json({"ok": True, "entry": _entry(dst)})


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


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        pass


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", max(1, rows), max(1, cols), 0, 0))


def _make_ctty() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_dumpable(value: bool) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, int(value), 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


def _harden() -> None:
    """Off the start-up path (ctypes costs ~3 ms); spawn() waits for it."""
    # Not dumpable: other processes in the sandbox (same uid) cannot open /proc/1/fd/*,
    # /proc/1/environ or /proc/1/mem.
    try:
        _set_dumpable(False)
    except Exception as e:
        print(f"corral-agent: cannot clear dumpable, refusing to run commands: {e}", file=sys.stderr)
        os._exit(1)  # fail closed: the daemon sees the sandbox die
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _import_subprocess()
    HARDENED.set()


def main() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)  # PID 1 stops only when the runtime kills it
    agent = Agent()
    listen_path = os.environ.get("CORRAL_AGENT_LISTEN")
    if listen_path:
        # Hibernatable sandboxes: the agent owns its listener (CRIU can checkpoint a socket made in the
        # sandbox's own network namespace, not one inherited from the host).
        try:
            os.unlink(listen_path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(listen_path)
        os.chmod(listen_path, 0o600)
        sock.listen(128)
    else:
        sock = socket.socket(fileno=LISTEN_FD)
    sock.setblocking(True)
    threading.Thread(target=agent.reaper, name="reaper", daemon=True).start()
    threading.Thread(target=agent.io_loop, name="io", daemon=True).start()
    threading.Thread(target=agent.timers.run, name="timers", daemon=True).start()
    threading.Thread(target=_harden, name="harden", daemon=True).start()
    while True:
        try:
            client, _ = sock.accept()
        except OSError:
            continue
        try:
            threading.Thread(target=agent.handle, args=(client,), daemon=True).start()
        except RuntimeError:
            # No thread to be had: the sandbox hit pids.max (a fork bomb). Serve this request
            # inline, so the daemon can still list and kill the culprits.
            agent.handle(client)


if __name__ == "__main__":
    main()
