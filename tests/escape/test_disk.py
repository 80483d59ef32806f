"""G3/G4: filling the disk or its inodes ends in ENOSPC inside the sandbox; the host is unaffected."""

from __future__ import annotations

import os

from corral import Sandbox


def test_disk_fill_is_enospc_inside_only(daemon, busybox):
    host_before = os.statvfs(daemon.data_dir)
    with Sandbox.create(template=busybox, resources={"disk_mib": 64}) as sb:
        r = sb.commands.run("dd if=/dev/zero of=/root/fill bs=1M count=500 2>&1; echo rc=$?")
        assert "No space left on device" in r.stdout and "rc=0" not in r.stdout
        inodes = sb.commands.run("mkdir /root/many && cd /root/many && i=0; "
                                 "while touch f$i 2>/dev/null; do i=$((i+1)); done; echo $i")
        assert 0 < int(inodes.stdout) < 100_000
        assert sb.commands.run("echo still-ok").stdout == "still-ok\n"
        sb.commands.run("rm -rf /root/fill /root/many")
        assert sb.commands.run("echo again > /root/f && cat /root/f").stdout == "again\n"
    host_after = os.statvfs(daemon.data_dir)
    # The host filesystem did not absorb the 64 MiB fill (images are sparse and deleted with the sandbox).
    assert abs(host_after.f_bavail - host_before.f_bavail) * host_before.f_frsize < 32 << 20
