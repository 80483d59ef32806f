"""The README flow, as a new user runs it: the `corral` command and the SDK snippet from the docs."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from tests.conftest import TEMPLATE_CACHE, free_port, traversable_tmp

CORRAL = [sys.executable, "-m", "corral.cli.main"]


@pytest.fixture(scope="module")
def env(base):
    tmp = traversable_tmp()
    e = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    e.update(CORRAL_DATA_DIR=str(tmp / "data"), CORRAL_RUN_DIR=str(tmp / "run"), CORRAL_PORT=str(free_port()),
             CORRAL_TEMPLATE_DIR=str(TEMPLATE_CACHE))
    out = subprocess.run([*CORRAL, "up", "--background"], env=e, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "corral daemon running" in out.stdout
    yield e
    ids = subprocess.run([*CORRAL, "sandbox", "ls", "--json"], env=e, capture_output=True, text=True).stdout
    import json

    for sb in json.loads(ids or "[]"):
        subprocess.run([*CORRAL, "sandbox", "rm", sb["id"]], env=e, capture_output=True)
    subprocess.run([*CORRAL, "down"], env=e, capture_output=True, timeout=60)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def corral(env, *args, check=True, input=None):
    r = subprocess.run([*CORRAL, *args], env=env, capture_output=True, text=True, timeout=300, input=input)
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def test_cli_flow(env):
    assert "already running" in corral(env, "up", "--background").stdout
    sid = corral(env, "sandbox", "create", "--template", "base").stdout.strip()
    assert sid.startswith("sb-")
    assert corral(env, "exec", sid, "--", "python3", "-c", "print(6*7)").stdout == "42\n"
    r = corral(env, "exec", sid, "--", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert sid in corral(env, "sandbox", "ls").stdout
    corral(env, "exec", sid, "--", "sh", "-c", "echo persisted > /workspace/f")
    corral(env, "sandbox", "stop", sid)
    assert "stopped" in corral(env, "sandbox", "ls").stdout
    # A stopped sandbox starts again on use (auto-resume), with its files.
    assert corral(env, "exec", sid, "--", "cat", "/workspace/f").stdout == "persisted\n"
    assert "AutoStarted" in corral(env, "sandbox", "ls").stdout
    corral(env, "sandbox", "pause", sid)
    assert "paused" in corral(env, "sandbox", "ls").stdout
    corral(env, "sandbox", "resume", sid)
    r = corral(env, "sandbox", "pause", sid, "--to-disk", check=False)
    assert r.returncode != 0 and "hibernatable" in r.stderr
    audit = corral(env, "audit", sid).stdout
    assert "sandbox.create" in audit and "sandbox.stop" in audit
    assert corral(env, "audit", "verify").stdout.startswith("OK")
    corral(env, "sandbox", "rm", sid)
    assert sid not in corral(env, "sandbox", "ls").stdout
    r = corral(env, "exec", sid, "--", "true", check=False)
    assert r.returncode == 2 and "SandboxNotFound" in r.stderr


def test_interactive_shell_with_resize_and_ctrl_c(env):
    sid = corral(env, "sandbox", "create", "--template", "base").stdout.strip()
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [*CORRAL, "shell", sid], env)
    out = b""

    def read_until(needle: bytes | re.Pattern[bytes], timeout: float = 15, start: int = 0) -> None:
        nonlocal out

        def seen() -> bool:
            return needle in out[start:] if isinstance(needle, bytes) else needle.search(out[start:]) is not None

        deadline = time.monotonic() + timeout
        while not seen() and time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    break
        assert seen(), out[-2000:]

    read_until(b"\x1b[?2004h")  # readline is ready (typeahead before that is flushed, as on any terminal)
    os.write(fd, b"echo hello-$((40+2))\r")
    read_until(b"hello-42")
    os.write(fd, b"sleep 60\r")
    time.sleep(0.5)
    mark = len(out)
    os.write(fd, b"\x03")  # Ctrl-C ends the sleep, not the shell
    # Type once the prompt is back: bash drops typeahead that reaches it with the SIGINT.
    read_until(re.compile(rb"\^C.*\x1b\[\?2004h", re.S), start=mark)  # readline is back
    os.write(fd, b"echo alive\r")
    read_until(b"alive\r\n")
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    os.kill(pid, 28)  # SIGWINCH, as a terminal emulator sends it
    # The resize travels CLI -> daemon -> agent on its own schedule: ask until the shell sees it.
    deadline = time.monotonic() + 20
    while True:
        os.write(fd, b"stty size\r")
        try:
            read_until(b"40 120", timeout=1)
            break
        except AssertionError:
            assert time.monotonic() < deadline, out[-2000:]
    os.write(fd, b"exit 3\r")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    corral(env, "sandbox", "rm", sid)


def test_sdk_snippet(env):
    code = r'''
from corral import Sandbox
with Sandbox.create(template="base", timeout_s=600) as sb:
    r = sb.commands.run("echo hi; echo oops >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code) == ("hi\n", "oops\n", 3)
    lines = []
    sb.commands.run("printf 'a\\nb\\n'", on_stdout=lines.append)
    assert "".join(lines) == "a\nb\n"
    p = sb.commands.run("sleep 100", background=True); p.kill()
    sb.files.write("/workspace/a.txt", b"data"); assert sb.files.read("/workspace/a.txt") == b"data"
    assert [f.name for f in sb.files.list("/workspace")] == ["a.txt"]
    sb.stop(); sb.start()
    assert sb.files.read("/workspace/a.txt") == b"data"
    sid = sb.id
sb2 = Sandbox.create(template="busybox")
assert Sandbox.connect(sb2.id).commands.run("echo ok").stdout == "ok\n"
assert sb2.id in [s.id for s in Sandbox.list()] and sid not in [s.id for s in Sandbox.list()]
sb2.kill()
print("SNIPPET-OK")
'''
    # No CORRAL_URL / CORRAL_API_KEY: the SDK finds the local daemon and key by itself
    # (CORRAL_PORT and CORRAL_DATA_DIR only move the defaults of this test daemon).
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "SNIPPET-OK" in r.stdout, r.stderr


def test_doctor_and_template_ls(env):
    r = corral(env, "doctor")
    assert "[ok  ] oci-runtime" in r.stdout and "[ok  ] user-namespaces" in r.stdout
    assert "base" in corral(env, "template", "ls").stdout


def test_cli_snapshots_volumes_and_backups(env, tmp_path):
    vol = f"cache-{os.getpid()}"
    assert corral(env, "volume", "create", vol, "--size-mib", "64").stdout.strip() == vol
    sid = corral(env, "sandbox", "create", "--template", "busybox", "--volume", f"{vol}:/cache").stdout.strip()
    corral(env, "exec", sid, "--", "sh", "-c", "echo kept > /root/f; echo shared > /cache/s")
    assert vol in corral(env, "volume", "ls").stdout and sid in corral(env, "volume", "ls").stdout
    snap = corral(env, "snapshot", "create", sid, "--name", f"cli-{os.getpid()}").stdout.strip()
    assert snap.startswith("snap-") and snap in corral(env, "snapshot", "ls").stdout
    fork = corral(env, "sandbox", "create", "--snapshot", snap, "--volume", f"{vol}:/ro:ro").stdout.strip()
    assert corral(env, "exec", fork, "--", "cat", "/root/f", "/ro/s").stdout == "kept\nshared\n"
    r = corral(env, "snapshot", "rm", snap, check=False)
    assert r.returncode != 0 and "in use" in r.stderr
    archive = tmp_path / "sb.tar.gz"
    corral(env, "backup", "export", sid, str(archive))
    r = corral(env, "volume", "rm", vol, check=False)
    assert r.returncode != 0 and "attached" in r.stderr
    for s in (fork, sid):
        corral(env, "sandbox", "rm", s)
    corral(env, "snapshot", "rm", snap)
    corral(env, "volume", "rm", vol)
    imported = corral(env, "backup", "import", str(archive)).stdout.strip()
    assert imported.startswith("sb-")
    info = corral(env, "sandbox", "info", imported).stdout
    assert f"volumes not on this host were not attached: {vol}" in info  # the volume was deleted above
    assert corral(env, "exec", imported, "--", "cat", "/root/f").stdout == "kept\n"  # auto-starts
    corral(env, "sandbox", "rm", imported)
