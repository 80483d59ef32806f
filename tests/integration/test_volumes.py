"""Named volumes: shared between sandboxes (read-write and read-only), size-limited, persistent."""

from __future__ import annotations

import secrets
import signal

import pytest

from corral import Sandbox, Volume, VolumeNotFoundError
from corral.errors import ConflictError, InvalidRequestError


def test_volume_shared_read_write_and_read_only_and_kept_after_sandboxes(daemon, busybox):
    name = f"cache-{secrets.token_hex(3)}"
    vol = Volume.create(name, size_mib=64)
    writer = Sandbox.create(template=busybox, volumes={"/cache": vol})
    reader = Sandbox.create(template=busybox, volumes={"/data": {"name": name, "read_only": True}})
    try:
        writer.files.write("/cache/pkg.tar", b"wheel-bytes")
        assert reader.files.read("/data/pkg.tar") == b"wheel-bytes"
        r = reader.commands.run("echo x > /data/evil 2>&1; echo rc=$?")
        assert "Read-only file system" in r.stdout + r.stderr and not writer.files.exists("/cache/evil")
        full = writer.commands.run("dd if=/dev/zero of=/cache/fill bs=1M count=200 2>&1; echo rc=$?").stdout
        assert "No space left on device" in full
        writer.commands.run("rm /cache/fill")
        assert set(Volume.get(name).attached_to) == {writer.id, reader.id}
        with pytest.raises(ConflictError, match="attached"):
            Volume.delete(name)
    finally:
        writer.kill()
        reader.kill()
    with Sandbox.create(template=busybox, volumes={"/v": name}) as again:
        assert again.files.read("/v/pkg.tar") == b"wheel-bytes"  # outlives the sandboxes
    Volume.delete(vol)
    with pytest.raises(VolumeNotFoundError):
        Volume.get(name)


def test_volume_errors(daemon, busybox):
    with pytest.raises(VolumeNotFoundError):
        Sandbox.create(template=busybox, volumes={"/x": "no-such-volume"})
    for bad in ("/proc/x", "relative", "/a/../b", "/", "/.corral/rt"):
        with pytest.raises(InvalidRequestError):
            Sandbox.create(template=busybox, volumes={bad: "whatever"})
    name = f"dup-{secrets.token_hex(3)}"
    Volume.create(name, size_mib=16)
    with pytest.raises(ConflictError):
        Volume.create(name, size_mib=16)
    Volume.delete(name)


def test_volume_survives_a_daemon_kill9(busybox):
    from tests.conftest import fresh_daemon

    with fresh_daemon() as d:
        with d.http() as h:
            h.post("/volumes", json={"name": "keep", "size_mib": 32})
            sid = h.post("/sandboxes", json={"template": "busybox", "volumes": {"/k": {"name": "keep"}}}).json()["id"]
            h.put(f"/sandboxes/{sid}/files", params={"path": "/k/f"}, content=b"durable")
        d.stop(signal.SIGKILL)
        d.start()
        with d.http() as h:
            assert h.get(f"/sandboxes/{sid}/files", params={"path": "/k/f"}).content == b"durable"
            h.delete(f"/sandboxes/{sid}")
            other = h.post("/sandboxes", json={"template": "busybox", "volumes": {"/k": {"name": "keep"}}}).json()
            assert h.get(f"/sandboxes/{other['id']}/files", params={"path": "/k/f"}).content == b"durable"
