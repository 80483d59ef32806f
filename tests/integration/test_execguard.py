"""The exec guard through the daemon: audit mode, allowlist mode, policy errors, the audit log's
queries, live stream and CLI, a daemon restart (the guard is adopted, never lost) and hibernation."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from corral import errors
from tests.conftest import fresh_daemon, require

BANNER = "curl 7."
CORRAL = [sys.executable, "-m", "corral.cli.main"]


def test_audit_mode_lets_it_run_and_records_it(sdk_sandbox):
    sb = sdk_sandbox(exec_policy={"mode": "audit", "deny": ["curl"]})
    r = sb.commands.run("curl --version")
    assert r.exit_code == 0 and BANNER in r.stdout
    assert [d.verdict for d in r.denials] == ["would-deny"] and r.denials[0].rule == "deny:curl"
    recs = sb.audit.list(kind="exec.decision")
    assert any(x.result == "would-deny" and x.detail["path"] == "/usr/bin/curl" for x in recs)
    assert any(x.result == "allow" for x in recs)  # every decision is recorded, allowed ones too
    # audit mode closes no gaps: the loader runs too, but is recorded
    r = sb.commands.run("/lib64/ld-linux-x86-64.so.2 /usr/bin/true")
    assert r.exit_code == 0 and [d.rule for d in r.denials] == ["loader"]


def test_allowlist_template_mode(sdk_sandbox):
    sb = sdk_sandbox(exec_policy={"mode": "enforce", "allow": ["template"]})
    r = sb.commands.run("ls / >/dev/null && python3 -c 'print(1)' && git --version >/dev/null && echo ok")
    assert r.exit_code == 0 and r.stdout.strip().endswith("ok"), r
    # an exact copy is the same content: allowed; a modified one is a new program: refused (A8, A23)
    assert sb.commands.run("cp /usr/bin/true /tmp/t && /tmp/t").exit_code == 0
    r = sb.commands.run("cp /usr/bin/true /tmp/m && printf x >> /tmp/m && /tmp/m")
    assert r.exit_code == 126 and [(d.rule, d.path) for d in r.denials] == [("allowlist", "/tmp/m")]
    # a script written in the sandbox is not in the template; an allowed interpreter still runs it
    sb.files.write("/workspace/job.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    r = sb.commands.run("/workspace/job.sh")
    assert r.exit_code == 126 and r.denials[0].rule == "allowlist"
    assert sb.commands.run("sh /workspace/job.sh").stdout == "ran\n"


def test_allowlist_by_name_and_hash(sdk_sandbox, daemon):
    import hashlib

    from tests.escape.escape_support import inside

    probe = sdk_sandbox()
    true_sha = hashlib.sha256(inside(daemon, probe, "/usr/bin/true").read_bytes()).hexdigest()
    sb = sdk_sandbox(exec_policy={"mode": "enforce", "allow": ["bash", "ls", f"sha256:{true_sha}"]})
    r = sb.commands.run("ls / >/dev/null && /usr/bin/true && echo ok")
    assert r.stdout == "ok\n"
    r = sb.commands.run("cat /etc/hostname")
    assert r.exit_code == 126 and r.denials[0].rule == "allowlist"


def test_policy_errors_are_clear(daemon, base):
    from corral import Sandbox

    with pytest.raises(errors.PolicyRejectedError, match="no executable of that name"):
        Sandbox.create(template=base, exec_policy={"mode": "enforce", "deny": ["no-such-tool"]})
    with pytest.raises(errors.InvalidRequestError, match="mode is 'off'"):
        Sandbox.create(template=base, exec_policy={"deny": ["curl"]})
    with pytest.raises(errors.InvalidRequestError, match="neither a program name"):
        Sandbox.create(template=base, exec_policy={"mode": "enforce", "deny": ["/usr/bin/curl"]})
    with pytest.raises(errors.InvalidRequestError, match="sha256"):
        Sandbox.create(template=base, exec_policy={"mode": "enforce", "deny": ["sha256:abc"]})


def test_audit_queries_stream_and_cli(sdk_sandbox, daemon):
    sb = sdk_sandbox(exec_policy={"mode": "enforce", "deny": ["curl"]})
    got: list[object] = []
    # The stream continues after the last record there is now (a stream "from now" would start
    # wherever the server happens to be when the lazy generator connects).
    after = max((r.seq for r in sb.audit.list(kind="exec.decision", limit=10000)), default=0)

    def follow() -> None:
        for rec in sb.audit.stream(kind="exec.decision", after=after):
            got.append(rec)
            if rec.result == "deny":
                break

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    t0 = time.time()
    assert sb.commands.run("curl --version").exit_code == 126
    t.join(15)
    assert not t.is_alive(), "the live stream did not deliver the denial"
    deny = [r for r in got if r.result == "deny"][0]  # type: ignore[attr-defined]
    assert deny.target == sb.id and deny.detail["rule"] == "deny:curl"  # type: ignore[attr-defined]
    # queries by sandbox, kind and time
    assert all(r.action == "exec.decision" for r in sb.audit.list(kind="exec.decision"))
    assert {r.action for r in sb.audit.list(kind="exec.")} >= {"exec.guard", "exec.decision"}
    assert sb.audit.list(kind="exec.decision", since=t0 + 3600) == []
    assert sb.audit.list(kind="exec.decision", until=t0 - 3600) == []
    # the CLI: table, JSON lines for a SIEM
    env = {**os.environ, **daemon.env}
    out = subprocess.run([*CORRAL, "audit", sb.id, "--kind", "exec.decision", "--jsonl"], capture_output=True,
                         text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(ln) for ln in out.stdout.splitlines()]
    assert any(x["result"] == "deny" and x["detail"]["sha256"] for x in lines)
    out = subprocess.run([*CORRAL, "audit", sb.id, "--kind", "exec.decision", "--since", "10m"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert "deny:curl" in out.stdout and "/usr/bin/curl" in out.stdout
    follow_cli = subprocess.Popen([*CORRAL, "audit", "-f", sb.id, "--kind", "exec.decision"], env=env,
                                  stdout=subprocess.PIPE, text=True)
    lines_seen: list[str] = []

    def read_cli() -> None:
        for ln in follow_cli.stdout:  # type: ignore[union-attr]
            lines_seen.append(ln)

    reader = threading.Thread(target=read_cli, daemon=True)
    reader.start()
    try:
        # `audit -f` starts from now, once connected: deny curl until the CLI's stream shows a denial.
        deadline = time.monotonic() + 30
        while not any("deny:curl" in ln for ln in lines_seen):
            assert time.monotonic() < deadline, f"corral audit -f showed no denial: {lines_seen}"
            sb.commands.run("curl --version")
            time.sleep(0.5)
    finally:
        follow_cli.kill()
        follow_cli.wait()
        reader.join(5)
        follow_cli.stdout.close()  # type: ignore[union-attr]


def test_an_edited_exec_record_fails_verify():
    with fresh_daemon() as d:
        with d.http() as h:
            sid = h.post("/sandboxes", json={"template": "base",
                                             "exec_policy": {"mode": "enforce", "deny": ["curl"]}}).json()["id"]
            assert h.post(f"/sandboxes/{sid}/exec", json={"cmd": "curl -V"}).json()["exit_code"] == 126
            h.delete(f"/sandboxes/{sid}")
        d.stop()
        db = sqlite3.connect(d.data_dir / "corral.db")
        seq = db.execute("SELECT seq FROM audit WHERE action='exec.decision' AND result='deny' LIMIT 1").fetchone()[0]
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET result='allow' WHERE seq=?", (seq,))
        db.commit()
        db.close()
        d.start()
        out = subprocess.run([*CORRAL, "audit", "verify"], env=d.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and f"record {seq} was modified" in out.stdout, out.stdout


def _init_pid(d, sid: str) -> int:  # type: ignore[no-untyped-def]
    out = subprocess.run(["crun", "--root", str(d.run_dir / "crun"), "state", sid], capture_output=True, text=True,
                         check=True).stdout
    return int(json.loads(out)["pid"])


def test_the_guard_outlives_a_daemon_restart():
    """The daemon goes away (SIGTERM, then kill -9): the holder keeps the marks, an exec in the sandbox
    waits for the next daemon, which adopts the group; curl stays refused throughout."""
    with fresh_daemon() as d:
        with d.http() as h:
            sid = h.post("/sandboxes", json={"template": "base",
                                             "exec_policy": {"mode": "enforce", "deny": ["curl"]}}).json()["id"]
        holder = int((d.data_dir / "sandboxes" / sid / "run" / "guard.pid").read_text())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            d.stop(sig)
            assert Path(f"/proc/{holder}").exists(), "the holder went away with the daemon"
            # No daemon: an exec in the sandbox (entered from the host) waits instead of running unguarded.
            waiter = subprocess.Popen(["nsenter", "-t", str(_init_pid(d, sid)), "-m", "-p", "-U",
                                       "--preserve-credentials", "/usr/bin/curl", "--version"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(1)
            assert waiter.poll() is None, "an exec ran while no guard could answer"
            d.start()
            out, _ = waiter.communicate(timeout=20)
            assert waiter.returncode != 0 and BANNER.encode() not in out  # answered (denied) by the new daemon
            with d.http() as h:
                r = h.post(f"/sandboxes/{sid}/exec", json={"cmd": "curl --version"}).json()
                assert r["exit_code"] == 126 and r["denials"] and BANNER not in r["stdout"], r
                recs = h.get("/audit", params={"target": sid, "kind": "exec.guard"}).json()["records"]
                assert recs[-1]["result"] == "adopted", recs
        with d.http() as h:
            h.delete(f"/sandboxes/{sid}")

        def holder_alive() -> bool:
            try:
                return b"sleep" in Path(f"/proc/{holder}/cmdline").read_bytes()
            except OSError:
                return False

        deadline = time.monotonic() + 10  # killed with the sandbox; it may take a moment to exit
        while holder_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not holder_alive(), "the guard's holder outlived its sandbox"


def test_hibernate_restore_rearms_the_guard(sdk_sandbox):
    require("hibernation")
    sb = sdk_sandbox(hibernatable=True, exec_policy={"mode": "enforce", "deny": ["curl"]})
    assert sb.commands.run("curl --version").exit_code == 126
    sb.pause(to_disk=True)
    r = sb.commands.run("curl --version; cat /proc/sys/vm/memfd_noexec")
    assert BANNER not in r.stdout and r.stdout.strip().endswith("2"), r
    assert r.denials and r.denials[0].rule == "deny:curl"
