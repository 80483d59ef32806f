"""corrald: the daemon process. `corral up` runs ``run_daemon``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from corral import errors
from corral.daemon.app import create_app
from corral.daemon.auth import KeyRing
from corral.daemon.service import Service
from corral.daemon.settings import DaemonSettings
from corral.daemon.store import Store
from corral.runtimes import images, oci

AGENT_SRC = Path(__file__).resolve().parent.parent / "agent"
log = logging.getLogger("corral.daemon")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _bind_sockets(settings: DaemonSettings) -> list[socket.socket]:
    # proto=IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP, and
    # without it Nagle + delayed ACK add 40 ms to every response.
    tcp = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM,
                        socket.IPPROTO_TCP)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        tcp.bind((settings.host, settings.port))
    except OSError as e:
        raise errors.RuntimeUnavailableError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror}",
                                             hint="another daemon may be running; try `corral down` or --port") from None
    tcp.listen(1024)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(settings.socket_path)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(settings.socket_path))
    os.chmod(settings.socket_path, 0o600)  # root only; sandboxes never see it anyway
    unix.listen(1024)
    return [tcp, unix]


def run_daemon(settings: DaemonSettings) -> None:
    setup_logging(settings.log_level)
    # Exec-guard threads answer the kernel while an exec waits: a thread that woke up must not wait
    # the default 5 ms for the event loop to hand over the GIL.
    sys.setswitchinterval(0.0005)
    if os.geteuid() != 0:
        raise errors.RuntimeUnavailableError("corrald must run as root (it creates namespaces, mounts and cgroups)")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o711)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    other = read_pid(settings.pid_path)
    if other and other != os.getpid():
        raise errors.ConflictError(f"a daemon is already running (pid {other})", hint="stop it with `corral down`")
    for parent in [settings.data_dir, *settings.data_dir.parents]:
        if not parent.stat().st_mode & 0o001:
            raise errors.RuntimeUnavailableError(
                f"{parent} is not searchable by other users, so sandboxes (unprivileged host uids) cannot reach "
                f"their root filesystems under {settings.data_dir}", hint=f"chmod o+x {parent}, or pick another --data-dir")
    hidden = oci.enter_private_mount_namespace()  # before any thread exists
    sockets = _bind_sockets(settings)
    settings.pid_path.write_text(f"{os.getpid()}\n")
    t0 = time.monotonic()
    agent_rt = images.ensure_agent_runtime(settings.data_dir)
    store = Store(settings.db_path)
    os.chmod(settings.db_path, 0o600)
    keyring = KeyRing(store)
    if keyring.ensure_local_key(settings.api_key_path):
        log.info("created the local API key", extra={"fields": {"path": str(settings.api_key_path)}})
    agent_src = images.install_agent_source(settings.data_dir, AGENT_SRC)
    runtime = oci.OciRuntime(settings.data_dir, settings.state_dir, agent_src, agent_rt)
    templates = images.TemplateStore(settings.template_dir)
    service = Service(settings, store, runtime, templates)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        report = await service.reconcile_startup()
        store.append_audit(None, "daemon.start", None, "ok", {"reconcile": report, "pid": os.getpid()})
        log.info("daemon ready", extra={"fields": {"url": settings.url, "socket": str(settings.socket_path),
                                                   "cgroup2_hidden": hidden, "reconcile": report,
                                                   "startup_ms": round((time.monotonic() - t0) * 1000, 1)}})
        task = asyncio.create_task(service.run_lifecycle())
        try:
            yield
        finally:
            task.cancel()
            await service.drain_pool()
            service.close_guards()
            await service.networks.stop()
            store.append_audit(None, "daemon.stop", None, "ok", {"pid": os.getpid()})

    app = create_app(service, keyring, lifespan=lifespan)
    config = uvicorn.Config(app, log_config=None, log_level=settings.log_level, access_log=False,
                            timeout_graceful_shutdown=5, ws_ping_interval=20)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=sockets)
    finally:
        with contextlib.suppress(OSError):
            if read_pid(settings.pid_path) == os.getpid():
                settings.pid_path.unlink()
        with contextlib.suppress(OSError):
            settings.socket_path.unlink()
        store.close()
