"""The files API: resolved by the agent inside the sandbox's own root, never on the host."""

from __future__ import annotations

import hashlib
import secrets
import socket
from pathlib import Path

import pytest

from corral import Sandbox
from corral.errors import FileConflictError, FileNotFoundInSandboxError, InvalidPathError, PayloadTooLargeError
from corral.sdk.client import Client
from corral.sdk.sync import run
from tests.conftest import Daemon, _ensure_template, fresh_daemon


@pytest.fixture(scope="module")
def sb(daemon, base):
    s = Sandbox.create(template=base)
    yield s
    s.kill()


def test_write_read_list_stat_mkdir_rename_remove(sb):
    sb.files.write("/workspace/a.txt", b"data")
    assert sb.files.read("/workspace/a.txt") == b"data"
    assert sb.commands.run("cat /workspace/a.txt").stdout == "data"
    sb.files.mkdir("/workspace/d/e")
    sb.files.write("/workspace/d/e/f.bin", bytes(range(256)))
    names = {(e.path, e.type) for e in sb.files.list("/workspace", depth=3)}
    assert {("/workspace/a.txt", "file"), ("/workspace/d", "dir"), ("/workspace/d/e/f.bin", "file")} <= names
    st = sb.files.stat("/workspace/d/e/f.bin")
    assert (st.type, st.size, st.mode) == ("file", 256, 0o644)
    sb.files.rename("/workspace/a.txt", "/workspace/b.txt")
    assert not sb.files.exists("/workspace/a.txt") and sb.files.exists("/workspace/b.txt")
    sb.files.remove("/workspace/d")
    assert not sb.files.exists("/workspace/d")
    sb.files.write("/workspace/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert sb.commands.run("/workspace/run.sh").stdout == "ran\n"


def test_large_file_streams_both_ways_intact(sb):
    blob = secrets.token_bytes(24 << 20)
    sb.files.write("/workspace/big", blob)
    assert sb.commands.run("sha256sum /workspace/big").stdout.split()[0] == hashlib.sha256(blob).hexdigest()
    assert sb.files.read("/workspace/big") == blob


@pytest.mark.parametrize("path", ["relative.txt", "/workspace/../etc/passwd", "/a/\x00b", "", "/x/.."])
def test_bad_paths_are_rejected_with_400(sb, path):
    with pytest.raises(InvalidPathError):
        sb.files.read(path)
    with pytest.raises(InvalidPathError):
        sb.files.write(path, b"x")


def test_url_encoded_traversal_is_not_decoded_twice(daemon, sb):
    with daemon.http() as h:
        r = h.get(f"/sandboxes/{sb.id}/files", params={"path": "/workspace/%2e%2e/etc/passwd"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "FileNotFound"


def test_symlink_out_of_the_sandbox_resolves_inside_it(sb):
    canary = Path("/root") / f"corral-canary-{secrets.token_hex(4)}"
    canary.write_text("HOST-SECRET")
    try:
        sb.commands.run(f"ln -sf {canary} /workspace/link; ln -sf /etc/hostname /workspace/host")
        with pytest.raises(FileNotFoundInSandboxError):
            sb.files.read("/workspace/link")
        assert sb.files.read("/workspace/host") == b"sandbox\n"  # the sandbox's own /etc/hostname
        # Writing through a dangling link to a host path creates nothing on the host.
        sb.files.write("/workspace/link2", b"x")
        sb.commands.run(f"rm /workspace/link2; ln -s {canary}.new /workspace/link2")
        sb.files.write("/workspace/link2", b"planted")
        assert not Path(f"{canary}.new").exists()
        assert sb.files.stat("/workspace/link2").type == "file"  # the link was replaced, not followed
    finally:
        canary.unlink()


def test_non_regular_files_are_refused(sb):
    sb.commands.run("mkfifo /workspace/fifo")
    with pytest.raises(FileConflictError, match="not a regular file"):
        sb.files.read("/workspace/fifo")
    with pytest.raises(FileConflictError):
        sb.files.read("/workspace")


def test_oversize_upload_gets_413_and_nothing_is_written(daemon, sb):
    # Declares 10 GiB and sends nothing: the daemon answers before reading a byte of the body.
    with socket.create_connection(("127.0.0.1", daemon.port)) as c:
        c.sendall(f"PUT /v1/sandboxes/{sb.id}/files?path=/workspace/huge HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {daemon.api_key}\r\nContent-Length: {10 << 30}\r\n\r\n".encode())
        c.settimeout(10)
        reply = ""
        while "PayloadTooLarge" not in reply and (chunk := c.recv(65536)):
            reply += chunk.decode()
    assert reply.startswith("HTTP/1.1 413") and '"PayloadTooLarge"' in reply
    assert not sb.files.exists("/workspace/huge")


def test_upload_over_the_limit_while_streaming_leaves_no_partial_file():
    with fresh_daemon(CORRAL_MAX_UPLOAD_BYTES=str(1 << 20)) as d:
        _ensure_template(d, "busybox")
        client = run(_client(d))
        with Sandbox.create(template="busybox", client=client) as s:
            async def chunks():
                for _ in range(4):  # no Content-Length: the limit is enforced while streaming
                    yield b"x" * (512 << 10)

            with pytest.raises(PayloadTooLargeError):
                s.files.write("/tmp/f", chunks())  # type: ignore[arg-type]
            assert s.commands.run("ls -a /tmp").stdout.split() == [".", ".."]
            s.files.write("/tmp/ok", b"y" * 1000)
            assert s.files.read("/tmp/ok") == b"y" * 1000
        run(client.close())


async def _client(d: Daemon) -> Client:
    return Client(d.url, d.api_key)


def test_files_on_a_stopped_sandbox_start_it_again(daemon, busybox):
    with Sandbox.create(template=busybox) as s:
        s.files.write("/root/f", b"kept")
        s.stop()
        assert s.files.read("/root/f") == b"kept"  # auto-resume
        assert (s.refresh().status, s.info.reason) == ("running", "AutoStarted")


def test_symlink_swap_race_during_uploads_never_writes_outside(sb):
    """H4: a directory swapped for a symlink to a host-looking path while files are uploaded into it."""
    marker = f"race-{secrets.token_hex(4)}"
    sb.commands.run("mkdir -p /workspace/d /workspace/real")
    p = sb.commands.run("while true; do mv /workspace/d /workspace/d.tmp; ln -s /root /workspace/d; "
                        "rm /workspace/d; mv /workspace/d.tmp /workspace/d; done", background=True)
    try:
        for i in range(100):
            try:
                sb.files.write(f"/workspace/d/{marker}-{i}", b"x")
            except Exception:  # the parent may be a symlink or missing at that instant
                pass
    finally:
        p.kill()
    assert not list(Path("/root").glob(f"{marker}-*"))  # the host's /root is untouched
    landed = sb.commands.run(f"find /workspace /root -name '{marker}-*' | wc -l").stdout.strip()
    assert int(landed) > 0  # the writes went somewhere inside the sandbox
