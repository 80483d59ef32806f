"""The ASGI app: routes parse requests into service calls; nothing here mutates state itself."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral import __version__, errors
from corral.agent import protocol as P
from corral.api import models as m
from corral.daemon.auth import KeyRing, Principal
from corral.daemon.service import Service
from corral.runtimes import probe as host_probe

log = logging.getLogger("corral.api")
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": m.ErrorBody} for s in (400, 401, 404, 408, 409, 413, 500, 502, 503)
}


def _principal(request: Request) -> Principal:
    keyring: KeyRing = request.app.state.keyring
    principal = keyring.authenticate(request.headers.get("authorization"))
    request.state.key_id = principal.key_id
    return principal


def _svc(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


router = APIRouter(prefix=m.API_PREFIX, dependencies=[Depends(_principal)], responses=ERROR_RESPONSES)


@router.get("/health", response_model=m.Health, name="health")
async def health(request: Request) -> m.Health:
    svc = _svc(request)
    return m.Health(ok=True, version=__version__, sandboxes_running=svc.running_count(),
                    schema_version=svc.store.schema_version(), warm_pool={t: len(r) for t, r in svc.pool.items()})


@router.get("/openapi.json", include_in_schema=False, name="openapi")
async def openapi_document(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/host", response_model=m.HostReport, name="host.probe")
async def host(request: Request) -> m.HostReport:
    feats = await asyncio.to_thread(host_probe.probe)
    return m.HostReport(ok=all(f.available for f in feats if f.required),
                        features=[m.HostFeature(**f.__dict__) for f in feats], runtime=host_probe.runtime_name())


@router.post("/sandboxes", response_model=m.SandboxInfo, status_code=201, name="sandbox.create")
async def create_sandbox(body: m.CreateSandboxRequest, request: Request,
                         principal: Principal = Depends(_principal)) -> m.SandboxInfo:
    info = await _svc(request).create(body, principal.key_id)
    request.state.audit_target = info.id
    request.state.audit_detail = {"template": body.template, "root": body.root}
    return info


@router.get("/sandboxes", response_model=m.SandboxList, name="sandbox.list")
async def list_sandboxes(request: Request) -> m.SandboxList:
    return _svc(request).list_sandboxes()


@router.get("/sandboxes/{sandbox_id}", response_model=m.SandboxInfo, name="sandbox.get")
async def get_sandbox(sandbox_id: str, request: Request) -> m.SandboxInfo:
    return _svc(request).get(sandbox_id)


@router.post("/sandboxes/{sandbox_id}/stop", response_model=m.SandboxInfo, name="sandbox.stop")
async def stop_sandbox(sandbox_id: str, request: Request) -> m.SandboxInfo:
    return await _svc(request).stop(sandbox_id)


@router.post("/sandboxes/{sandbox_id}/pause", response_model=m.SandboxInfo, name="sandbox.pause")
async def pause_sandbox(sandbox_id: str, request: Request, body: m.PauseRequest | None = None) -> m.SandboxInfo:
    return await _svc(request).pause(sandbox_id, to_disk=bool(body and body.to_disk))


@router.post("/sandboxes/{sandbox_id}/resume", response_model=m.SandboxInfo, name="sandbox.resume")
async def resume_sandbox(sandbox_id: str, request: Request) -> m.SandboxInfo:
    return await _svc(request).resume(sandbox_id)


@router.patch("/sandboxes/{sandbox_id}", response_model=m.SandboxInfo, name="sandbox.update")
async def update_sandbox(sandbox_id: str, body: m.UpdateSandboxRequest, request: Request) -> m.SandboxInfo:
    request.state.audit_detail = body.model_dump(exclude_none=True)
    return _svc(request).update(sandbox_id, body)


@router.put("/sandboxes/{sandbox_id}/network", response_model=m.SandboxInfo, name="sandbox.network_update")
async def update_network(sandbox_id: str, body: m.NetworkUpdate, request: Request) -> m.SandboxInfo:
    request.state.audit_detail = body.model_dump(exclude_none=True)
    return await _svc(request).update_network(sandbox_id, body)


@router.post("/sandboxes/{sandbox_id}/start", response_model=m.SandboxInfo, name="sandbox.start")
async def start_sandbox(sandbox_id: str, request: Request) -> m.SandboxInfo:
    return await _svc(request).start(sandbox_id)


@router.delete("/sandboxes/{sandbox_id}", status_code=204, name="sandbox.delete")
async def delete_sandbox(sandbox_id: str, request: Request) -> Response:
    await _svc(request).delete(sandbox_id)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/exec", response_model=m.ExecResult, name="sandbox.exec")
async def exec_command(sandbox_id: str, body: m.ExecRequest, request: Request) -> m.ExecResult:
    request.state.audit_detail = _exec_detail(body)
    return await _svc(request).exec(sandbox_id, body)


def _exec_detail(body: m.ExecRequest) -> dict[str, Any]:
    cmd = body.cmd if body.cmd is not None else json.dumps(body.argv)
    return {"cmd": cmd[:1024], "background": body.background, "user": body.user}


@router.get("/sandboxes/{sandbox_id}/processes", response_model=m.ProcessList, name="process.list")
async def list_processes(sandbox_id: str, request: Request) -> m.ProcessList:
    return await _svc(request).processes(sandbox_id)


@router.post("/sandboxes/{sandbox_id}/processes/{pid}/signal", status_code=204, name="process.signal")
async def signal_process(sandbox_id: str, pid: int, body: m.SignalRequest, request: Request) -> Response:
    await _svc(request).signal(sandbox_id, pid, body.signal)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/processes/{pid}/stdin", status_code=204, name="process.stdin")
async def process_stdin(sandbox_id: str, pid: int, body: m.StdinRequest, request: Request) -> Response:
    await _svc(request).stdin(sandbox_id, pid, body.data.encode(), body.eof)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox_id}/files", name="files.read",
            responses={200: {"content": {"application/octet-stream": {}}}})
async def read_file(sandbox_id: str, request: Request, path: str = Query(...)) -> StreamingResponse:
    _size, chunks = await _svc(request).open_read(sandbox_id, path)
    request.state.audit_detail = {"path": path[:1024]}
    # No Content-Length: the size comes from the sandbox and may lie (/proc files, a file that
    # grows while it is read). The body is sent chunked and capped by the service.
    return StreamingResponse(chunks, media_type="application/octet-stream")


@router.put("/sandboxes/{sandbox_id}/files", response_model=m.WriteResult, name="files.write")
async def write_file(sandbox_id: str, request: Request, path: str = Query(...),
                     mode: int = Query(0o644, ge=0, le=0o7777)) -> m.WriteResult:
    svc = _svc(request)
    limit = svc.settings.max_upload_bytes
    request.state.audit_detail = {"path": path[:1024]}
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise errors.PayloadTooLargeError(f"upload of {declared} bytes exceeds the limit of {limit} bytes")

    async def body() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise errors.PayloadTooLargeError(f"upload exceeds the limit of {limit} bytes")
            yield chunk

    return await svc.write(sandbox_id, path, body(), mode)


@router.delete("/sandboxes/{sandbox_id}/files", status_code=204, name="files.remove")
async def remove_file(sandbox_id: str, request: Request, path: str = Query(...),
                      recursive: bool = Query(True)) -> Response:
    request.state.audit_detail = {"path": path[:1024]}
    await _svc(request).file_op(sandbox_id, "remove", path=path, recursive=recursive)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox_id}/files/list", response_model=m.FileList, name="files.list")
async def list_files(sandbox_id: str, request: Request, path: str = Query(...),
                     depth: int = Query(1, ge=1, le=16)) -> m.FileList:
    r = await _svc(request).file_op(sandbox_id, "list", path=path, depth=depth)
    return m.FileList(entries=[m.FileEntry.model_validate(e) for e in r.get("entries", [])])


@router.get("/sandboxes/{sandbox_id}/files/stat", response_model=m.FileEntry, name="files.stat")
async def stat_file(sandbox_id: str, request: Request, path: str = Query(...)) -> m.FileEntry:
    r = await _svc(request).file_op(sandbox_id, "stat", path=path)
    return m.FileEntry.model_validate(r.get("entry"))


@router.post("/sandboxes/{sandbox_id}/files/mkdir", response_model=m.FileEntry, name="files.mkdir")
async def make_dir(sandbox_id: str, body: m.PathRequest, request: Request) -> m.FileEntry:
    request.state.audit_detail = {"path": body.path[:1024]}
    r = await _svc(request).file_op(sandbox_id, "mkdir", path=body.path, parents=body.parents)
    return m.FileEntry.model_validate(r.get("entry"))


@router.post("/sandboxes/{sandbox_id}/files/rename", response_model=m.FileEntry, name="files.rename")
async def rename_file(sandbox_id: str, body: m.RenameRequest, request: Request) -> m.FileEntry:
    request.state.audit_detail = {"src": body.src[:1024], "dst": body.dst[:1024]}
    r = await _svc(request).file_op(sandbox_id, "rename", src=body.src, dst=body.dst)
    return m.FileEntry.model_validate(r.get("entry"))


@router.post("/sandboxes/{sandbox_id}/snapshots", response_model=m.SnapshotInfo, status_code=201,
             name="snapshot.create")
async def create_snapshot(sandbox_id: str, request: Request, body: m.SnapshotCreate | None = None) -> m.SnapshotInfo:
    info = await _svc(request).snapshot(sandbox_id, body.name if body else None)
    request.state.audit_detail = {"snapshot": info.id, "name": info.name}
    return info


@router.get("/snapshots", response_model=m.SnapshotList, name="snapshot.list")
async def list_snapshots(request: Request) -> m.SnapshotList:
    return _svc(request).list_snapshots()


@router.get("/snapshots/{snapshot}", response_model=m.SnapshotInfo, name="snapshot.get")
async def get_snapshot(snapshot: str, request: Request) -> m.SnapshotInfo:
    return _svc(request).get_snapshot(snapshot)


@router.delete("/snapshots/{snapshot}", status_code=204, name="snapshot.delete")
async def delete_snapshot(snapshot: str, request: Request) -> Response:
    request.state.audit_target = snapshot
    await _svc(request).delete_snapshot(snapshot)
    return Response(status_code=204)


@router.post("/volumes", response_model=m.VolumeInfo, status_code=201, name="volume.create")
async def create_volume(body: m.VolumeCreate, request: Request) -> m.VolumeInfo:
    request.state.audit_target = body.name
    return await _svc(request).create_volume(body)


@router.put("/secrets/{name}", response_model=m.SecretInfo, name="secret.set")
async def set_secret(name: str, body: m.SecretSet, request: Request) -> m.SecretInfo:
    request.state.audit_target = name
    info = _svc(request).set_secret(name, body)
    request.state.audit_detail = {"hosts": info.hosts, "injection": info.injection.kind, "env": info.env,
                                  "allow_requests": info.allow_requests}
    return info


@router.get("/secrets", response_model=m.SecretList, name="secret.list")
async def list_secrets(request: Request) -> m.SecretList:
    return _svc(request).list_secrets()


@router.delete("/secrets/{name}", status_code=204, name="secret.delete")
async def delete_secret(name: str, request: Request) -> Response:
    request.state.audit_target = name
    _svc(request).delete_secret(name)
    return Response(status_code=204)


@router.get("/volumes", response_model=m.VolumeList, name="volume.list")
async def list_volumes(request: Request) -> m.VolumeList:
    return _svc(request).list_volumes()


@router.get("/volumes/{name}", response_model=m.VolumeInfo, name="volume.get")
async def get_volume(name: str, request: Request) -> m.VolumeInfo:
    return _svc(request).get_volume(name)


@router.delete("/volumes/{name}", status_code=204, name="volume.delete")
async def delete_volume(name: str, request: Request) -> Response:
    request.state.audit_target = name
    await _svc(request).delete_volume(name)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox_id}/backup", name="backup.export_sandbox",
            responses={200: {"content": {"application/gzip": {}}}})
async def export_sandbox(sandbox_id: str, request: Request) -> FileResponse:
    return _archive(await _svc(request).export_backup(m.check_sandbox_id(sandbox_id)), sandbox_id)


def _archive(path: Path, name: str) -> FileResponse:
    """Send a backup archive and delete the temp file once it is sent."""
    return FileResponse(path, media_type="application/gzip", filename=f"{name}.tar.gz",
                        background=BackgroundTask(path.unlink, missing_ok=True))


@router.get("/snapshots/{snapshot}/backup", name="backup.export_snapshot",
            responses={200: {"content": {"application/gzip": {}}}})
async def export_snapshot(snapshot: str, request: Request) -> FileResponse:
    request.state.audit_target = snapshot
    return _archive(await _svc(request).export_backup(snapshot), snapshot)


@router.post("/backups", response_model=m.ImportResult, status_code=201, name="backup.import",
             openapi_extra={"requestBody": {"content": {"application/gzip": {}}, "required": True}})
async def import_backup(request: Request) -> m.ImportResult:
    svc = _svc(request)
    limit = svc.settings.max_upload_bytes
    path = svc._tmp().with_suffix(".upload")
    try:
        seen = 0
        with open(path, "wb") as f:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise errors.PayloadTooLargeError(f"the archive exceeds the upload limit of {limit} bytes")
                f.write(chunk)
        result = await svc.import_backup(path)
    finally:
        path.unlink(missing_ok=True)
    request.state.audit_detail = {"kind": result.kind, "snapshots": [s.id for s in result.snapshots]}
    if result.sandbox:
        request.state.audit_target = result.sandbox.id
    return result


@router.get("/templates", response_model=m.TemplateList, name="template.list")
async def list_templates(request: Request) -> m.TemplateList:
    return _svc(request).list_templates()


@router.post("/templates/{name}/build", name="template.build",
             responses={200: {"content": {"application/x-ndjson": {}},
                              "description": "progress lines {\"progress\"}, then {\"done\"} or {\"error\"}"}})
async def build_template(name: str, request: Request, force: bool = Query(False)) -> StreamingResponse:
    svc = _svc(request)
    from corral.runtimes.images import validate_template_name

    validate_template_name(name)
    if name not in {t.name for t in svc.list_templates().templates}:
        raise errors.TemplateNotFoundError(f"no template named {name!r}")
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def run() -> None:
        try:
            info = await svc.ensure_template(name, lambda line: queue.put_nowait({"progress": line}), force=force)
            queue.put_nowait({"done": {"name": info.name, "built": True, "description": info.description,
                                       "built_at": info.built_at, "size_bytes": info.size_bytes, "files": info.files}})
        except errors.CorralError as e:
            queue.put_nowait(e.to_body())
        except Exception as e:  # report, never hang the client
            queue.put_nowait(errors.InternalError(f"template build failed: {e}").to_body())

    task = asyncio.create_task(run())

    async def lines() -> AsyncIterator[bytes]:
        while True:
            item = await queue.get()
            yield (json.dumps(item) + "\n").encode()
            if "progress" not in item:
                break
        await task

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/audit", response_model=m.AuditList, name="audit.list")
async def audit_list(request: Request, target: str | None = None, after: int = Query(0, ge=0),
                     limit: int = Query(1000, ge=1, le=10000),
                     kind: str | None = Query(None, description="an action (exec.decision) or a prefix ending in '.'"),
                     since: float | None = Query(None, description="unix time, inclusive"),
                     until: float | None = Query(None, description="unix time, exclusive")) -> m.AuditList:
    return _svc(request).audit_list(target, after, limit, kind=kind, since=since, until=until)


@router.get("/audit/stream", name="audit.stream",
            responses={200: {"content": {"application/x-ndjson": {}},
                             "description": "audit records as JSON lines, live, until the client disconnects"}})
async def audit_stream(request: Request, target: str | None = None, kind: str | None = None,
                       after: int | None = Query(None, ge=0, description="start after this seq; absent: from now")
                       ) -> StreamingResponse:
    svc = _svc(request)
    start = svc.audit_tail() if after is None else after

    async def lines() -> AsyncIterator[bytes]:
        last = start
        idle = 0.0
        while not await request.is_disconnected():
            svc.flush_guard_events()
            svc.networks.flush()
            recs = svc.audit_list(target, last, 500, kind=kind).records
            for r in recs:
                yield (r.model_dump_json() + "\n").encode()
                last = r.seq
            if recs:
                idle = 0.0
                continue
            await asyncio.sleep(0.1)
            idle += 0.1
            if idle >= 15:  # a blank line keeps proxies from closing a quiet stream
                idle = 0.0
                yield b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/audit/verify", response_model=m.AuditVerify, name="audit.verify")
async def audit_verify(request: Request) -> m.AuditVerify:
    return await asyncio.to_thread(_svc(request).audit_verify)


# ---- WebSockets ----------------------------------------------------------------------------------
ws_router = APIRouter(prefix=m.API_PREFIX)


async def _ws_auth(ws: WebSocket) -> Principal | None:
    try:
        principal: Principal = ws.app.state.keyring.authenticate(ws.headers.get("authorization"))
    except errors.AuthenticationError as e:
        await ws.close(code=4401, reason=e.message[:120])
        return None
    ws.state.key_id = principal.key_id
    await ws.accept()
    return principal


async def _ws_error(ws: WebSocket, e: errors.CorralError) -> None:
    ws.state.audit_error = e.code
    with contextlib.suppress(Exception):
        await ws.send_json({"type": "error", **e.to_body()["error"]})
        await ws.close(code=4000 + e.http_status if e.http_status < 1000 else 4500)


@ws_router.websocket("/sandboxes/{sandbox_id}/exec/ws", name="sandbox.exec_stream")
async def exec_ws(ws: WebSocket, sandbox_id: str) -> None:
    if await _ws_auth(ws) is None:
        return
    try:
        try:
            req = m.ExecRequest.model_validate(await ws.receive_json())
        except (ValidationError, ValueError) as e:
            raise errors.InvalidRequestError(f"invalid exec request: {e}") from None
        ws.state.audit_detail = _exec_detail(req)
        conn, pid = await ws.app.state.service.exec_stream(sandbox_id, req)
    except errors.CorralError as e:
        await _ws_error(ws, e)
        return
    except WebSocketDisconnect:
        return
    await _pump(ws, conn, pid)


@ws_router.websocket("/sandboxes/{sandbox_id}/processes/{pid}/ws", name="process.attach")
async def attach_ws(ws: WebSocket, sandbox_id: str, pid: int) -> None:
    if await _ws_auth(ws) is None:
        return
    try:
        conn, pid = await ws.app.state.service.attach(sandbox_id, pid)
    except errors.CorralError as e:
        await _ws_error(ws, e)
        return
    await _pump(ws, conn, pid)


async def _forward_client(ws: WebSocket, conn: Any) -> None:
    """Stdin and control messages from the WebSocket client to the agent."""
    while True:
        try:
            msg = m.WsClientMessage.model_validate(await ws.receive_json())
        except (ValidationError, ValueError):
            await ws.send_json({"type": "error", "code": "InvalidRequest", "message": "bad client message"})
            continue
        if msg.type == "stdin":
            await conn.send(P.STDIN, base64.b64decode(msg.data or ""))
        elif msg.type == "close_stdin":
            await conn.send_json({"op": "close_stdin"})
        elif msg.type == "signal":
            await conn.send_json({"op": "signal", "signal": msg.signal or 15})
        elif msg.type == "resize":
            await conn.send_json({"op": "resize", "rows": msg.rows or 24, "cols": msg.cols or 80})


async def _pump(ws: WebSocket, conn: Any, pid: int) -> None:
    await ws.send_json({"type": "started", "pid": pid})

    async def from_client() -> None:
        try:
            await _forward_client(ws, conn)
        except (OSError, ConnectionError):
            pass  # the command ended and the agent closed its side; its exit event is still read

    reader = asyncio.create_task(from_client())
    try:
        while True:
            kind, data = await conn.read_frame()
            if kind == P.JSON:
                ev = P.decode_json(data)
                await ws.send_json({"type": "exit", "exit_code": ev.get("exit_code"), "signal": ev.get("signal"),
                                    "timed_out": bool(ev.get("timed_out"))})
                break
            name = "stdout" if kind == P.STDOUT else "stderr"
            await ws.send_json({"type": name, "data": base64.b64encode(data).decode()})
        await ws.close()
    except (WebSocketDisconnect, RuntimeError):
        pass
    except errors.CorralError as e:
        await _ws_error(ws, e)
    finally:
        reader.cancel()
        conn.close()


# ---- audit middleware ----------------------------------------------------------------------------
class AuditMiddleware:
    """Appends one audit record per API call (HTTP or WebSocket) after it completes."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 0}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "websocket.accept":
                status["code"] = 101
            elif message["type"] == "websocket.close" and not status["code"]:
                status["code"] = int(message.get("code", 1000))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._record(scope, status["code"], t0)

    def _record(self, scope: Scope, code: int, t0: float) -> None:
        state = scope.get("state") or {}
        route = scope.get("route")
        action = getattr(route, "name", None) or f"{scope.get('method', 'WS')} {scope.get('path', '')}"[:200]
        params = scope.get("path_params") or {}
        target = state.get("audit_target") or params.get("sandbox_id")
        result = str(code) + (f" {state['audit_error']}" if state.get("audit_error") else "")
        detail = {"method": scope.get("method", "WEBSOCKET"), "path": scope.get("path", "")[:512]}
        detail.update(state.get("audit_detail") or {})
        app = scope["app"]
        try:
            app.state.service.audit(state.get("key_id"), action, str(target)[:64] if target else None, result, detail)
        except Exception:
            log.exception("could not append to the audit log")
        # Every call is in the audit log already; the log line is for debugging (and for server errors).
        level = logging.WARNING if code >= 500 else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "request", extra={"fields": {"action": action, "target": target, "result": result,
                                                        "ms": round((time.perf_counter() - t0) * 1000, 2)}})


# ---- app -----------------------------------------------------------------------------------------
def create_app(service: Service | None = None, keyring: KeyRing | None = None, lifespan: Any = None) -> FastAPI:
    # The OpenAPI document is served at /v1/openapi.json behind the API key like everything else.
    app = FastAPI(title="Corral", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None,
                  generate_unique_id_function=lambda route: route.name,
                  description="Self-hosted, secure, persistent sandboxes for AI coding agents. "
                              "Every request needs 'Authorization: Bearer <key>'.")
    app.state.service = service
    app.state.keyring = keyring
    app.include_router(router)
    app.include_router(ws_router)

    @app.exception_handler(errors.CorralError)
    async def corral_error(request: Request, exc: errors.CorralError) -> JSONResponse:
        request.state.audit_error = exc.code
        return JSONResponse(exc.to_body(), status_code=exc.http_status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cls = {404: errors.NotFoundError, 405: errors.InvalidRequestError}.get(exc.status_code, errors.InvalidRequestError)
        err = cls(f"{request.method} {request.url.path}: {exc.detail}",
                  hint="see /v1/openapi.json for the routes this daemon serves")
        request.state.audit_error = err.code
        return JSONResponse(err.to_body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
        err = errors.InvalidRequestError(f"{'.'.join(first['loc'][1:]) or 'body'}: {first['msg']}"[:500],
                                         details={"problems": problems[:20]})
        request.state.audit_error = err.code
        return JSONResponse(err.to_body(), status_code=400)

    app.add_middleware(AuditMiddleware)

    def openapi() -> dict[str, Any]:
        # Validation errors answer 400 with ErrorBody (see validation_error), never FastAPI's 422.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
