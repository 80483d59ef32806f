"""The `corral` command: thin over the SDK (and over the daemon module for `corral up`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from corral import errors
from corral.sdk import client as c

_CTRL = {i: f"\\x{i:02x}" for i in range(32) if i not in (9,)} | {127: "\\x7f"}


def clean(text: Any) -> str:
    """Escape control characters (ANSI/OSC sequences, newlines) in values shown to a human."""
    return str(text).translate(_CTRL)


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_client(fn: Any) -> Any:
    cl = c.Client()
    try:
        return await fn(cl)
    finally:
        await cl.close()


# ---- daemon ------------------------------------------------------------------------------------
def cmd_up(a: argparse.Namespace) -> int:
    from corral.daemon.main import read_pid, run_daemon
    from corral.daemon.settings import DaemonSettings

    settings = DaemonSettings.from_env(port=a.port, host=a.host, data_dir=a.data_dir, log_level=a.log_level)
    pid = read_pid(settings.pid_path)
    if pid:
        print(f"corral daemon already running (pid {pid}) on {settings.url}")
        return 0
    if not a.background:
        run_daemon(settings)
        return 0
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log = open(settings.log_path, "ab")
    argv = [sys.executable, "-m", "corral.cli.main", "up", "--port", str(settings.port), "--host", settings.host,
            "--data-dir", str(settings.data_dir), "--log-level", a.log_level]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                            close_fds=True, env={**os.environ, "CORRAL_RUN_DIR": str(settings.run_dir)})
    key_path = settings.api_key_path
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"corral daemon exited during start-up (code {proc.returncode}); see {settings.log_path}",
                  file=sys.stderr)
            return 1
        if key_path.exists():
            try:
                r = httpx.get(f"{settings.url}/v1/health", timeout=1,
                              headers={"Authorization": f"Bearer {key_path.read_text().strip()}"})
                if r.status_code == 200:
                    print(f"corral daemon running (pid {proc.pid}) on {settings.url} and unix://{settings.socket_path}")
                    print(f"data: {settings.data_dir}  log: {settings.log_path}  api key: {key_path}")
                    return 0
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    print(f"corral daemon did not become ready in 60s; see {settings.log_path}", file=sys.stderr)
    return 1


def cmd_down(a: argparse.Namespace) -> int:
    from corral.daemon.main import read_pid
    from corral.daemon.settings import DaemonSettings

    settings = DaemonSettings.from_env()
    pid = read_pid(settings.pid_path)
    if not pid:
        print("corral daemon is not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if read_pid(settings.pid_path) is None:
            break
        time.sleep(0.1)
    print(f"corral daemon (pid {pid}) stopped; sandboxes keep running and are re-adopted by the next `corral up`")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    from corral.runtimes import probe

    feats = probe.probe()
    if a.json:
        print(json.dumps([f.__dict__ for f in feats], indent=2))
    else:
        for f in feats:
            mark = "ok  " if f.available else ("FAIL" if f.required else "--  ")
            print(f"[{mark}] {f.name:<18} {f.detail}")
        print(f"isolation tier: OCI containers on {probe.runtime_name() or 'nothing (install crun)'}; "
              "user, pid, mount, net, ipc, uts and cgroup namespaces; seccomp; no_new_privs")
    return 0 if all(f.available for f in feats if f.required) else 1


# ---- templates ---------------------------------------------------------------------------------
async def _build_template(cl: c.Client, name: str, force: bool = False, quiet_if_built: bool = False) -> None:
    if quiet_if_built:
        r = await cl.json("GET", "/templates")
        if any(t["name"] == name and t["built"] for t in r["templates"]):
            return
    async with cl.stream("POST", f"/templates/{name}/build", params={"force": force}) as r:
        async for line in r.aiter_lines():
            if not line.strip():
                continue
            msg = json.loads(line)
            if "progress" in msg:
                print(f"[template {name}] {clean(msg['progress'])}", file=sys.stderr, flush=True)
            elif "error" in msg:
                raise errors.from_body(500, msg)


def cmd_template(a: argparse.Namespace) -> int:
    if a.action == "build":
        _run(_with_client(lambda cl: _build_template(cl, a.name, a.force)))
        return 0
    r = _run(_with_client(lambda cl: cl.json("GET", "/templates")))
    _table([[t["name"], "yes" if t["built"] else "no", f"{(t['size_bytes'] or 0) >> 20} MiB" if t["built"] else "-",
             _fmt_time(t["built_at"]), clean(t["description"])] for t in r["templates"]],
           ["name", "built", "size", "built at", "description"])
    return 0


# ---- sandboxes ---------------------------------------------------------------------------------
def _policy_args(a: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"template": a.template, "root": a.root}
    if a.snapshot:
        body["snapshot"] = a.snapshot
    for spec in a.volume or []:
        name, _, rest = spec.partition(":")
        path, _, mode = rest.partition(":")
        body.setdefault("volumes", {})[path] = {"name": name, "read_only": mode == "ro"}
    for k in ("timeout_s", "on_timeout", "idle_timeout_s", "on_idle"):
        if getattr(a, k) is not None:
            body[k] = getattr(a, k)
    res = {k: v for k, v in (("cpu_cores", a.cpu_cores), ("memory_mib", a.memory_mib), ("pids_max", a.pids_max))
           if v is not None}
    if res:
        body["resources"] = res
    if a.env:
        body["env"] = dict(_kv(e) for e in a.env)
    if a.allow or a.deny or a.secret or a.network:
        body["network"] = {"allow": a.allow or [], "deny": a.deny or []}
    if a.secret:
        body["secrets"] = a.secret
    return body


def _kv(s: str) -> tuple[str, str]:
    k, sep, v = s.partition("=")
    if not sep:
        raise SystemExit(f"expected KEY=VALUE, got {s!r}")
    return k, v


def cmd_sandbox(a: argparse.Namespace) -> int:
    act = a.action
    if act == "create":
        async def create(cl: c.Client) -> Any:
            await _build_template(cl, a.template, quiet_if_built=True)
            return await cl.json("POST", "/sandboxes", json=_policy_args(a))

        info = _run(_with_client(create))
        print(info["id"])
        return 0
    if act == "ls":
        r = _run(_with_client(lambda cl: cl.json("GET", "/sandboxes")))
        if a.json:
            print(json.dumps(r["sandboxes"], indent=2))
            return 0
        _table([[s["id"], s["template"], s["status"], clean(s["reason"]), _fmt_time(s["created_at"]),
                 _fmt_time(s["timeout_at"])] for s in r["sandboxes"]],
               ["id", "template", "status", "reason", "created", "timeout at"])
        return 0
    if act == "info":
        print(json.dumps(_run(_with_client(lambda cl: cl.json("GET", f"/sandboxes/{a.id}"))), indent=2))
        return 0
    for sid in a.ids:
        if act == "stop":
            _run(_with_client(lambda cl, sid=sid: cl.json("POST", f"/sandboxes/{sid}/stop")))
        elif act == "start":
            _run(_with_client(lambda cl, sid=sid: cl.json("POST", f"/sandboxes/{sid}/start")))
        elif act == "pause":
            _run(_with_client(lambda cl, sid=sid: cl.json("POST", f"/sandboxes/{sid}/pause", json={"to_disk": a.to_disk})))
        elif act == "resume":
            _run(_with_client(lambda cl, sid=sid: cl.json("POST", f"/sandboxes/{sid}/resume")))
        elif act == "rm":
            _run(_with_client(lambda cl, sid=sid: cl.request("DELETE", f"/sandboxes/{sid}")))
        print(sid)
    return 0


def cmd_exec(a: argparse.Namespace) -> int:
    argv = list(a.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: corral exec SANDBOX -- COMMAND [ARGS...]")

    async def go(cl: c.Client) -> int:
        sb = await c.AsyncSandbox.connect(a.id, client=cl)

        def out(s: str) -> None:
            sys.stdout.write(s)
            sys.stdout.flush()

        def err(s: str) -> None:
            sys.stderr.write(s)
            sys.stderr.flush()

        cmd: str | list[str] = argv[0] if len(argv) == 1 and " " in argv[0] else argv
        res = await sb.commands.run(cmd, env=dict(_kv(e) for e in a.env or []), cwd=a.cwd, user=a.user,
                                    timeout_s=a.timeout_s, on_stdout=out, on_stderr=err)
        return int(res.exit_code if res.exit_code is not None else 1)

    return int(_run(_with_client(go)))


def cmd_shell(a: argparse.Namespace) -> int:
    import termios
    import tty

    async def go(cl: c.Client) -> int:
        sb = await c.AsyncSandbox.connect(a.id, client=cl)
        interactive = sys.stdin.isatty()
        rows, cols = (os.get_terminal_size() if interactive else os.terminal_size((24, 80)))
        h = await sb.pty.create(rows=rows, cols=cols, cmd=a.cmd)
        loop = asyncio.get_running_loop()
        old = termios.tcgetattr(sys.stdin) if interactive else None
        if interactive:
            tty.setraw(sys.stdin.fileno())
            loop.add_signal_handler(signal.SIGWINCH, lambda: asyncio.ensure_future(h.resize(*os.get_terminal_size()[::-1])))

        def on_input() -> None:
            data = os.read(sys.stdin.fileno(), 4096)
            if data:
                asyncio.ensure_future(h.send(data))
            else:
                loop.remove_reader(sys.stdin.fileno())
                asyncio.ensure_future(h.send(b"\x04"))

        loop.add_reader(sys.stdin.fileno(), on_input)
        try:
            async for chunk in h.output():
                os.write(sys.stdout.fileno(), chunk)
        finally:
            loop.remove_reader(sys.stdin.fileno())
            if old is not None:
                termios.tcsetattr(sys.stdin, termios.TCSADRAIN, old)
        return int(h.exit_code or 0)

    return int(_run(_with_client(go)))


# ---- snapshots ---------------------------------------------------------------------------------
def cmd_snapshot(a: argparse.Namespace) -> int:
    if a.action == "create":
        r = _run(_with_client(lambda cl: cl.json("POST", f"/sandboxes/{a.sandbox}/snapshots", json={"name": a.name})))
        print(r["id"])
        return 0
    if a.action == "rm":
        for ref in a.refs:
            _run(_with_client(lambda cl, ref=ref: cl.request("DELETE", f"/snapshots/{ref}")))
            print(ref)
        return 0
    r = _run(_with_client(lambda cl: cl.json("GET", "/snapshots")))
    _table([[s["id"], clean(s["name"] or "-"), s["sandbox_id"], s["template"], str(s["files"]),
             f"{s['size_bytes'] / 1e6:.1f} MB", f"{s['new_bytes'] / 1e6:.1f} MB", _fmt_time(s["created_at"]),
             ",".join(s["in_use_by"]) or "-"] for s in r["snapshots"]],
           ["id", "name", "from", "template", "files", "size", "new", "created", "in use by"])
    return 0


# ---- network and secrets -----------------------------------------------------------------------
def cmd_network(a: argparse.Namespace) -> int:
    body = {k: v for k, v in (("allow", a.allow), ("deny", a.deny)) if v is not None}
    if a.clear_deny:
        body["deny"] = []
    if body:
        info = _run(_with_client(lambda cl: cl.json("PUT", f"/sandboxes/{a.id}/network", json=body)))
    else:
        info = _run(_with_client(lambda cl: cl.json("GET", f"/sandboxes/{a.id}")))
    net = info["policy"].get("network")
    print(json.dumps({"network": net, "secrets": info["policy"].get("secrets", [])}, indent=2))
    return 0


def _read_secret_value(a: argparse.Namespace) -> str:
    if a.value_file:
        text = Path(a.value_file).read_text()
    elif sys.stdin.isatty():
        import getpass

        text = getpass.getpass(f"value of {a.name}: ")
    else:
        text = sys.stdin.read()
    return text.rstrip("\r\n")  # `echo token | corral secret set` and files end with a newline


def cmd_secret(a: argparse.Namespace) -> int:
    if a.action == "set":
        if sum(bool(x) for x in (a.header, a.basic_user, a.placeholder_header)) > 1:
            raise SystemExit("choose one of --header, --basic-user and --placeholder-header")
        injection: dict[str, Any] = {"kind": "header"}
        if a.header:
            name, sep, template = a.header.partition(":")
            if not sep:
                raise SystemExit("--header wants 'Name: template with {value}', e.g. 'Authorization: Bearer {value}'")
            injection.update(header=name.strip(), template=template.strip())
        elif a.basic_user:
            injection = {"kind": "basic", "username": a.basic_user}
        elif a.placeholder_header:
            injection = {"kind": "placeholder", "headers": a.placeholder_header}
        body = {"value": _read_secret_value(a), "hosts": a.host, "injection": injection, "env": a.env,
                "allow_requests": a.allow_request or []}
        r = _run(_with_client(lambda cl: cl.json("PUT", f"/secrets/{a.name}", json=body)))
        print(f"{r['name']}: hosts {', '.join(r['hosts'])}; sandboxes see {r['placeholder']}")
        return 0
    if a.action == "rm":
        for name in a.names:
            _run(_with_client(lambda cl, name=name: cl.request("DELETE", f"/secrets/{name}")))
            print(name)
        return 0
    r = _run(_with_client(lambda cl: cl.json("GET", "/secrets")))
    if a.json:
        print(json.dumps(r["secrets"], indent=2))
        return 0

    def how(inj: dict[str, Any]) -> str:
        if inj["kind"] == "header":
            return f"{inj['header']}: {inj['template']}"
        if inj["kind"] == "basic":
            return f"basic auth as {inj['username']}"
        return "placeholder in " + ", ".join(inj["headers"])

    _table([[x["name"], ",".join(x["hosts"]), how(x["injection"]), "; ".join(x["allow_requests"]) or "any",
             x["env"] or "-", x["placeholder"]]
            for x in r["secrets"]], ["name", "hosts", "injection", "requests", "env", "placeholder"])
    return 0


def cmd_logs(a: argparse.Namespace) -> int:
    """`corral logs --audit sb-…`: what happened in a sandbox (API calls, exec and network decisions,
    secret uses), from the audit log."""
    a.target = a.id
    return cmd_audit(a)


# ---- volumes -----------------------------------------------------------------------------------
def cmd_volume(a: argparse.Namespace) -> int:
    if a.action == "create":
        _run(_with_client(lambda cl: cl.json("POST", "/volumes", json={"name": a.name, "size_mib": a.size_mib})))
        print(a.name)
        return 0
    if a.action == "rm":
        for name in a.names:
            _run(_with_client(lambda cl, name=name: cl.request("DELETE", f"/volumes/{name}")))
            print(name)
        return 0
    r = _run(_with_client(lambda cl: cl.json("GET", "/volumes")))
    _table([[v["name"], f"{v['size_mib']} MiB", "-" if v["used_bytes"] is None else f"{v['used_bytes'] / 1e6:.1f} MB",
             _fmt_time(v["created_at"]), ",".join(v["attached_to"]) or "-"] for v in r["volumes"]],
           ["name", "size", "used", "created", "attached to"])
    return 0


# ---- backups -----------------------------------------------------------------------------------
def cmd_backup(a: argparse.Namespace) -> int:
    if a.action == "export":
        route = f"/sandboxes/{a.ref}/backup" if a.ref.startswith("sb-") else f"/snapshots/{a.ref}/backup"

        async def download(cl: c.Client) -> int:
            size = 0
            async with cl.stream("GET", route) as r:
                with open(a.file + ".part", "wb") as f:
                    async for chunk in r.aiter_bytes(1 << 20):
                        f.write(chunk)
                        size += len(chunk)
            os.replace(a.file + ".part", a.file)
            return size

        size = _run(_with_client(download))
        print(f"{a.file} ({size / 1e6:.1f} MB)")
        return 0

    async def upload(cl: c.Client) -> Any:
        async def chunks() -> Any:
            with open(a.file, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return await cl.json("POST", "/backups", content=chunks(), headers={"content-type": "application/gzip"})

    r = _run(_with_client(upload))
    if r.get("sandbox"):
        print(r["sandbox"]["id"])
    else:
        print(r["snapshots"][-1]["id"])
    return 0


# ---- audit -------------------------------------------------------------------------------------
def _when(text: str) -> float:
    """A time bound: unix seconds, ISO 8601, or an age like 90s, 10m, 2h, 7d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
            return time.time() - float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        pass
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise SystemExit(f"corral: {text!r} is not a time (unix seconds, ISO 8601, or an age like 10m)") from None


def _audit_detail(x: dict[str, Any]) -> str:
    d = x["detail"]
    if x["action"] == "exec.decision":
        sha = (d.get("sha256") or "")[:12]
        return f"pid {d.get('pid', '?')} {d.get('path', '?')} sha256:{sha} {d.get('rule', '')}"
    return str(d.get("cmd", d.get("path", d.get("rule", ""))))


def _audit_row(x: dict[str, Any]) -> list[str]:
    return [str(x["seq"]), _fmt_time(x["ts"]), clean(x["key_id"] or "-"), clean(x["action"]),
            clean(x["target"] or "-"), clean(x["result"]), clean(_audit_detail(x))[:100]]


def cmd_audit(a: argparse.Namespace) -> int:
    if a.target == "verify":
        r = _run(_with_client(lambda cl: cl.json("GET", "/audit/verify")))
        print(("OK: " if r["ok"] else "TAMPERED: ") + r["message"])
        return 0 if r["ok"] else 1
    if a.follow:
        async def follow(cl: c.Client) -> None:
            audit = c.AsyncAudit(cl, a.target)
            async for rec in audit.stream(kind=a.kind):
                x = rec.model_dump(mode="json")
                print(json.dumps(x) if a.json else "  ".join(_audit_row(x)), flush=True)

        with contextlib.suppress(KeyboardInterrupt):
            _run(_with_client(follow))
        return 0
    params: dict[str, Any] = {"limit": a.limit}
    for k in ("target", "kind"):
        if getattr(a, k):
            params[k] = getattr(a, k)
    if a.since:
        params["since"] = _when(a.since)
    if a.until:
        params["until"] = _when(a.until)
    r = _run(_with_client(lambda cl: cl.json("GET", "/audit", params=params)))
    recs = r["records"]
    if a.json:
        for rec in recs:
            print(json.dumps(rec))
        return 0
    _table([_audit_row(x) for x in recs], ["seq", "time", "key", "action", "target", "result", "detail"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corral", description="Secure, persistent sandboxes for AI coding agents.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the daemon (embedded SQLite, API on 127.0.0.1:7770 and a unix socket)")
    up.add_argument("--background", "-d", action="store_true", help="detach; write a pidfile; wait until ready")
    up.add_argument("--port", type=int)
    up.add_argument("--host")
    up.add_argument("--data-dir")
    up.add_argument("--log-level", default="info")
    up.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the daemon (sandboxes keep running)").set_defaults(fn=cmd_down)
    doc = sub.add_parser("doctor", help="what this host supports for isolation, and why not")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(fn=cmd_doctor)

    sb = sub.add_parser("sandbox", help="create, list, stop, start and remove sandboxes")
    sbs = sb.add_subparsers(dest="action", required=True)
    cr = sbs.add_parser("create", help="create and start a sandbox; prints its id")
    cr.add_argument("--template", default="base")
    cr.add_argument("--root", choices=["template", "host"], default="template")
    cr.add_argument("--snapshot", help="start from this snapshot (id or name)")
    cr.add_argument("--volume", action="append", metavar="NAME:/PATH[:ro]", help="attach a volume")
    cr.add_argument("--timeout-s", type=int)
    cr.add_argument("--on-timeout", choices=["stop", "pause", "hibernate", "delete"])
    cr.add_argument("--idle-timeout-s", type=int)
    cr.add_argument("--on-idle", choices=["pause", "hibernate", "stop"])
    cr.add_argument("--cpu-cores", type=float)
    cr.add_argument("--memory-mib", type=int)
    cr.add_argument("--pids-max", type=int)
    cr.add_argument("--env", action="append", metavar="KEY=VALUE")
    cr.add_argument("--allow", action="append", metavar="ENTRY",
                    help="egress allow entry: name, *.suffix, CIDR, with optional :port (gives the sandbox a network)")
    cr.add_argument("--deny", action="append", metavar="ENTRY", help="egress deny entry (deny wins)")
    cr.add_argument("--secret", action="append", metavar="NAME", help="a registered secret the proxy injects")
    cr.add_argument("--network", action="store_true", help="a network with nothing allowed yet (see `corral network`)")
    ls = sbs.add_parser("ls", help="list sandboxes")
    ls.add_argument("--json", action="store_true")
    info = sbs.add_parser("info", help="show one sandbox as JSON")
    info.add_argument("id")
    for name, hlp in (("stop", "stop (processes end, files kept)"), ("start", "start a stopped sandbox"),
                      ("pause", "freeze (processes kept in memory, zero CPU)"),
                      ("resume", "thaw a paused sandbox (or start a stopped one)"),
                      ("rm", "stop and delete with its files")):
        x = sbs.add_parser(name, help=hlp)
        x.add_argument("ids", nargs="+", metavar="id")
        if name == "pause":
            x.add_argument("--to-disk", action="store_true", help="hibernate (needs CRIU 4.x; see corral doctor)")
    sb.set_defaults(fn=cmd_sandbox)

    ex = sub.add_parser("exec", help="run a command; exits with its exit code")
    ex.add_argument("id")
    ex.add_argument("--cwd")
    ex.add_argument("--user")
    ex.add_argument("--env", action="append", metavar="KEY=VALUE")
    ex.add_argument("--timeout-s", type=float, default=None)
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(fn=cmd_exec)
    sh = sub.add_parser("shell", help="interactive shell on a PTY")
    sh.add_argument("id")
    sh.add_argument("--cmd", help="run this instead of the login shell")
    sh.set_defaults(fn=cmd_shell)

    tp = sub.add_parser("template", help="list or build templates")
    tps = tp.add_subparsers(dest="action", required=True)
    tps.add_parser("ls")
    b = tps.add_parser("build")
    b.add_argument("name")
    b.add_argument("--force", action="store_true")
    tp.set_defaults(fn=cmd_template)

    sn = sub.add_parser("snapshot", help="snapshots: create, ls, rm (fork with sandbox create --snapshot)")
    sns = sn.add_subparsers(dest="action", required=True)
    sc = sns.add_parser("create", help="snapshot a sandbox's files; prints the snapshot id")
    sc.add_argument("sandbox")
    sc.add_argument("--name")
    sns.add_parser("ls")
    srm = sns.add_parser("rm", help="delete (refused while a sandbox or snapshot uses it)")
    srm.add_argument("refs", nargs="+", metavar="snapshot")
    sn.set_defaults(fn=cmd_snapshot)

    vo = sub.add_parser("volume", help="named persistent volumes: create, ls, rm")
    vos = vo.add_subparsers(dest="action", required=True)
    vc = vos.add_parser("create")
    vc.add_argument("name")
    vc.add_argument("--size-mib", type=int, default=1024)
    vos.add_parser("ls")
    vrm = vos.add_parser("rm", help="delete a volume and its data (refused while attached)")
    vrm.add_argument("names", nargs="+", metavar="name")
    vo.set_defaults(fn=cmd_volume)

    bk = sub.add_parser("backup", help="export a sandbox or snapshot to an archive, or import one")
    bks = bk.add_subparsers(dest="action", required=True)
    be = bks.add_parser("export")
    be.add_argument("ref", help="sb-… or a snapshot id/name")
    be.add_argument("file")
    bi = bks.add_parser("import", help="prints the new (stopped) sandbox's id, or the top snapshot's")
    bi.add_argument("file")
    bk.set_defaults(fn=cmd_backup)

    def audit_filters(x: argparse.ArgumentParser, kinds: str) -> None:
        x.add_argument("--json", "--jsonl", action="store_true", help="JSON lines, for a SIEM")
        x.add_argument("-n", "--limit", type=int, default=1000)
        x.add_argument("-f", "--follow", action="store_true", help="stream new records as they are written")
        x.add_argument("--kind", help=f"an action ({kinds}…) or a prefix ending in '.'")
        x.add_argument("--since", help="unix seconds, ISO 8601, or an age like 10m")
        x.add_argument("--until", help="unix seconds, ISO 8601, or an age like 10m")

    au = sub.add_parser("audit", help="list the audit log (of one sandbox), or `corral audit verify`")
    au.add_argument("target", nargs="?", help="a sandbox id, or 'verify' to check the hash chain")
    audit_filters(au, "exec.decision, exec.guard, sandbox.create")
    au.set_defaults(fn=cmd_audit)

    lg = sub.add_parser("logs", help="a sandbox's audit trail: API calls, exec, network and secret decisions")
    lg.add_argument("id")
    lg.add_argument("--audit", action="store_true", help="the audit log (the only log kept per sandbox)")
    audit_filters(lg, "net.deny, secret.use, exec.decision")
    lg.set_defaults(fn=cmd_logs)

    nw = sub.add_parser("network", help="show or change a sandbox's egress lists (live)")
    nw.add_argument("id")
    nw.add_argument("--allow", action="append", metavar="ENTRY", help="the new allow list (repeat; replaces it)")
    nw.add_argument("--deny", action="append", metavar="ENTRY", help="the new deny list (repeat; replaces it)")
    nw.add_argument("--clear-deny", action="store_true", help="empty the deny list")
    nw.set_defaults(fn=cmd_network)

    se = sub.add_parser("secret", help="credentials the egress proxy injects; values never come back out")
    ses = se.add_subparsers(dest="action", required=True)
    ss = ses.add_parser("set", help="register or replace a secret; the value is read from stdin (or a prompt)")
    ss.add_argument("name")
    ss.add_argument("--host", action="append", required=True, help="name or *.suffix it is injected for (repeat)")
    ss.add_argument("--header", help="'Name: template' with {value}; default 'Authorization: Bearer {value}'")
    ss.add_argument("--basic-user", help="inject as HTTP basic auth with this user name")
    ss.add_argument("--placeholder-header", action="append",
                    help="replace the placeholder by the value only inside this header (repeat)")
    ss.add_argument("--env", help="variable that carries the placeholder in sandboxes using the secret")
    ss.add_argument("--value-file", help="read the value from this file instead of stdin")
    ss.add_argument("--allow-request", action="append", metavar="'METHOD /path'",
                    help="only these requests may carry it, e.g. 'GET /repos/org/*' (repeat); others get 403")
    sl = ses.add_parser("ls", help="names, hosts, injection and placeholders (never values)")
    sl.add_argument("--json", action="store_true")
    sr = ses.add_parser("rm")
    sr.add_argument("names", nargs="+", metavar="name")
    se.set_defaults(fn=cmd_secret)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except errors.CorralError as e:
        print(f"error: {e.code}: {clean(e.message)}", file=sys.stderr)
        if e.hint:
            print(f"hint: {clean(e.hint)}", file=sys.stderr)
        return 2 if isinstance(e, errors.InvalidRequestError | errors.NotFoundError) else 1
    except KeyboardInterrupt:
        return 130
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
