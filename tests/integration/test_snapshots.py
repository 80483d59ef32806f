"""Snapshots and forks: content-addressed, deduplicated, consistent under concurrent writes."""

from __future__ import annotations

import secrets
import time

import pytest

from corral import Sandbox, SnapshotNotFoundError, Snapshots
from corral.errors import ConflictError


def _sums(sb, path: str = "/root/data") -> str:
    return sb.commands.run(f"cd {path} && find . -type f | sort | xargs sha256sum").stdout


def test_snapshot_and_forks_keep_files_deletions_and_opaque_dirs(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        for i in range(4):
            sb.files.write(f"/root/data/f{i}", secrets.token_bytes(20000 + i))
        sb.commands.run("rm /bin/vi; rm -rf /etc; mkdir /etc; echo only > /etc/only; "
                        "chmod 640 /root/data/f0; ln -s f1 /root/data/link; mkfifo /root/data/pipe")
        before = _sums(sb)
        snap = sb.snapshot(name=f"setup-{secrets.token_hex(3)}")
        assert snap.id.startswith("snap-") and snap.files == 5 and snap.sandbox_id == sb.id
        a, b = Sandbox.create(from_snapshot=snap), Sandbox.create(from_snapshot=snap.name)
        try:
            for fork in (a, b):
                assert fork.info.policy.snapshot == snap.id and fork.info.template == busybox
                assert _sums(fork) == before
                r = fork.commands.run("test -e /bin/vi && echo vi; ls /etc; stat -c %a /root/data/f0; "
                                      "readlink /root/data/link; test -p /root/data/pipe && echo fifo")
                assert r.stdout.split() == ["only", "640", "f1", "fifo"]
            a.commands.run("echo changed > /root/data/f1; rm /root/data/f2")
            assert _sums(b) == before  # forks are independent
            assert Snapshots.get(snap.id).in_use_by == sorted([a.id, b.id]) or set(
                Snapshots.get(snap.id).in_use_by) == {a.id, b.id}
            with pytest.raises(ConflictError, match="in use"):
                Snapshots.delete(snap)
        finally:
            a.kill()
            b.kill()
        assert _sums(sb) == before  # the source is untouched
        Snapshots.delete(snap)
        with pytest.raises(SnapshotNotFoundError):
            Snapshots.get(snap.id)


def test_unchanged_files_cost_nothing_in_a_second_snapshot(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        sb.files.write("/root/big", secrets.token_bytes(2 << 20))
        first = sb.snapshot()
        assert first.new_bytes >= 2 << 20
        sb.files.write("/root/small", b"x" * 100)
        second = sb.snapshot()
        assert second.new_bytes == 100 and second.size_bytes >= (2 << 20) + 100
        for s in (second, first):
            Snapshots.delete(s)


def test_a_fork_of_a_fork_chains_layers(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        sb.files.write("/root/one", b"1")
        s1 = sb.snapshot()
        child = Sandbox.create(from_snapshot=s1)
        child.files.write("/root/two", b"2")
        s2 = child.snapshot()
        assert s2.parent == s1.id
        grandchild = Sandbox.create(from_snapshot=s2)
        try:
            assert grandchild.commands.run("cat /root/one /root/two").stdout == "12"
            assert s2.id in Snapshots.get(s1.id).in_use_by
        finally:
            grandchild.kill()
            child.kill()
        Snapshots.delete(s2)
        Snapshots.delete(s1)


def test_snapshot_during_concurrent_writes_is_consistent(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        writer = sb.commands.run("i=0; while true; do i=$((i+1)); echo $i >> /root/log; "
                                 "echo $i > /root/last.tmp; mv /root/last.tmp /root/last; done", background=True)
        deadline = time.monotonic() + 15
        while not sb.files.exists("/root/last"):  # writing is under way when the snapshot is taken
            assert time.monotonic() < deadline, "the writer wrote nothing"
            time.sleep(0.05)
        time.sleep(0.2)
        snap = sb.snapshot()
        writer.kill()
        with Sandbox.create(from_snapshot=snap) as fork:
            lines = fork.files.read("/root/log").decode().splitlines()
            last = int(fork.files.read("/root/last"))
            # Frozen at one instant: the log is a complete 1..N sequence and `last` agrees with it.
            assert lines == [str(i) for i in range(1, len(lines) + 1)]
            assert last in (len(lines), len(lines) - 1)
        Snapshots.delete(snap)


def test_snapshot_of_a_stopped_sandbox(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        sb.files.write("/root/f", b"stopped-state")
        sb.stop()
        snap = sb.snapshot()
        assert sb.refresh().status == "stopped"
        with Sandbox.create(from_snapshot=snap) as fork:
            assert fork.files.read("/root/f") == b"stopped-state"
        Snapshots.delete(snap)


def test_unknown_snapshot(daemon, busybox):
    with pytest.raises(SnapshotNotFoundError):
        Sandbox.create(from_snapshot="snap-000000000000")
