"""The filesystem boundary: /proc and /sys knobs, the agent's runtime, masked kernel information,
leaked file descriptors, host paths and secrets, and symlinks aimed at the host.

ATTACKS.md rows A16, B3, C5, C6, C19-C21, D1, D3, D5, H2, H3.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import pytest

from corral import CorralError, FileNotFoundInSandboxError, Sandbox
from tests.escape.escape_support import attack


def _mount_opts(sb, path: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Per-mount options of the mount at ``path`` inside the sandbox."""
    for line in sb.commands.run("cat /proc/self/mountinfo").stdout.splitlines():
        f = line.split()
        if f[4] == path:
            return f[5].split(",")
    raise AssertionError(f"{path} is not a mount point in the sandbox")


def test_proc_sys_core_pattern_and_sysrq_are_not_writable(shared_sb):
    host_core = Path("/proc/sys/kernel/core_pattern").read_text()
    r = attack(shared_sb, """
        def write(path, data):
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError as e:
                return ename(e.errno)
            try:
                os.write(fd, data)
                return "OK"
            except OSError as e:
                return ename(e.errno)
            finally:
                os.close(fd)
        res = {
            "/proc/sys/kernel/core_pattern": write("/proc/sys/kernel/core_pattern", b"|/tmp/pwn %p"),
            "/proc/sysrq-trigger": write("/proc/sysrq-trigger", b"c"),
            "/proc/sys/kernel/modprobe": write("/proc/sys/kernel/modprobe", b"/tmp/pwn"),
            "/proc/sys/vm/drop_caches": write("/proc/sys/vm/drop_caches", b"3"),
            "/proc/sys/kernel/hostname": write("/proc/sys/kernel/hostname", b"pwned"),
            "/proc/sys/fs/binfmt_misc/register": write("/proc/sys/fs/binfmt_misc/register", b":pwn:E::pwn::/tmp/pwn:"),
        }
        done(res=res, core_pattern=open("/proc/sys/kernel/core_pattern").read(),
             pwn_created=os.path.exists("/tmp/pwn"))
    """)
    # Files the host kernel has are refused by permission (owned by host root, which has no uid
    # inside); the rest are absent on this kernel too (no CONFIG_MAGIC_SYSRQ or CONFIG_MODULES).
    knobs = ("/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger", "/proc/sys/kernel/modprobe",
             "/proc/sys/vm/drop_caches", "/proc/sys/kernel/hostname")
    expected = {p: "EACCES" if os.path.exists(p) else "ENOENT" for p in knobs}
    expected["/proc/sys/fs/binfmt_misc/register"] = "ENOENT"  # binfmt_misc is never mounted inside
    assert r == {"res": expected,
                 "core_pattern": host_core, "pwn_created": False}
    sh = shared_sb.commands.run("echo '|/tmp/pwn %p' > /proc/sys/kernel/core_pattern")
    # The shell opens with O_CREAT|O_TRUNC, which meets the read-only mount before the permission check.
    assert sh.exit_code == 1 and "/proc/sys/kernel/core_pattern: Read-only file system" in sh.stderr
    assert Path("/proc/sys/kernel/core_pattern").read_text() == host_core  # the host's is unchanged
    assert "ro" in _mount_opts(shared_sb, "/proc/sys")  # and read-only beneath the permission check


def test_sys_and_cgroupfs_are_not_writable(shared_sb):
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    host_thp = Path(thp).read_text() if os.path.exists(thp) else None
    r = attack(shared_sb, f"""
        def write(path, data):
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError as e:
                return ename(e.errno)
            os.close(fd)
            return "OK"
        release_agents = [os.path.join(d, f) for d, _, fs in os.walk("/sys/fs") for f in fs
                          if f in ("release_agent", "notify_on_release", "cgroup.procs")]
        res = dict(
            thp=write("{thp}", b"always"),
            uevent_helper=write("/sys/kernel/uevent_helper", b"/tmp/pwn"),
            mkdir_cgroup=oserr(os.mkdir, "/sys/fs/cgroup/corral-escape"),
            mkdir_bpffs=oserr(os.mkdir, "/sys/fs/bpf/corral-escape"),
            create_in_sys=oserr(os.open, "/sys/corral-escape", os.O_WRONLY | os.O_CREAT, 0o644),
        )
        done(res=res, release_agents=release_agents, cgroup_dir=os.listdir("/sys/fs/cgroup"),
             bpffs=os.listdir("/sys/fs/bpf") if os.path.isdir("/sys/fs/bpf") else None)
    """)
    uevent = "EACCES" if os.path.exists("/sys/kernel/uevent_helper") else "ENOENT"
    # mkdir in sysfs fails in the lookup (kernfs dirs have no mkdir): ENOENT; creating a file at the
    # top of /sys reaches the read-only mount check: EROFS.
    assert r == {"res": {"thp": "EACCES", "uevent_helper": uevent, "mkdir_cgroup": "ENOENT",
                         "mkdir_bpffs": "ENOENT", "create_in_sys": "EROFS"},
                 "release_agents": [], "cgroup_dir": [], "bpffs": []}
    if host_thp is not None:
        assert Path(thp).read_text() == host_thp
    assert "ro" in _mount_opts(shared_sb, "/sys")


def test_agent_runtime_and_source_are_read_only(shared_sb):
    r = attack(shared_sb, """
        res = {}
        for d, victim in (("/.corral/rt", "/.corral/rt/bin/python3"), ("/.corral/agent", "/.corral/agent/agent.py")):
            res[d] = dict(
                create=oserr(os.open, d + "/planted", os.O_WRONLY | os.O_CREAT, 0o755),
                mkdir=oserr(os.mkdir, d + "/planted-dir"),
                symlink=oserr(os.symlink, "/tmp/x", d + "/planted-link"),
                unlink=oserr(os.unlink, victim),
                rename=oserr(os.rename, victim, victim + ".old"),
                chmod=oserr(os.chmod, victim, 0o777),
                chown=oserr(os.chown, victim, 0, 0),
                utime=oserr(os.utime, victim, (0, 0)),
                truncate=oserr(os.truncate, victim, 0),
                open_write=oserr(os.open, victim, os.O_WRONLY),
            )
        sizes = {p: os.path.getsize(p) for p in ("/.corral/rt/bin/python3", "/.corral/agent/agent.py")}
        done(res=res, sizes=sizes, planted=[p for p in ("/.corral/rt/planted", "/.corral/agent/planted")
                                            if os.path.lexists(p)])
    """)
    # Creating, removing, renaming or changing anything is EROFS. Opening an existing file for write
    # or truncating it is refused one step earlier by permissions (its owner, host root, has no uid
    # inside, so CAP_DAC_OVERRIDE does not apply): EACCES.
    expected = {"create": "EROFS", "mkdir": "EROFS", "symlink": "EROFS", "unlink": "EROFS", "rename": "EROFS",
                "chmod": "EROFS", "chown": "EROFS", "utime": "EROFS", "truncate": "EACCES", "open_write": "EACCES"}
    assert r["res"] == {"/.corral/rt": expected, "/.corral/agent": expected}
    assert r["planted"] == [] and all(v > 0 for v in r["sizes"].values())
    assert "ro" in _mount_opts(shared_sb, "/.corral/rt")
    assert {"ro", "noexec"} <= set(_mount_opts(shared_sb, "/.corral/agent"))


def test_kernel_information_is_masked(shared_sb):
    r = attack(shared_sb, """
        def size(p):
            try:
                with open(p, "rb") as f:
                    return len(f.read(65536))
            except OSError as e:
                return ename(e.errno)
        res = {p: size(p) for p in ("/proc/kallsyms", "/proc/keys", "/proc/timer_list", "/proc/sched_debug",
                                    "/proc/kcore")}
        dirs = {d: (os.listdir(d) if os.path.isdir(d) else None)
                for d in ("/sys/firmware", "/sys/kernel/debug", "/proc/acpi", "/proc/scsi")}
        done(res=res, dirs=dirs, syslog=sc(103, 3, ctypes.create_string_buffer(4096), 4096))
    """)
    for p, v in r["res"].items():
        assert v in (0, "ENOENT"), (p, v)  # empty (masked) or absent, never kernel addresses
    assert all(v in ([], None) for v in r["dirs"].values()), r["dirs"]
    assert r["syslog"] == "EPERM"
    d = shared_sb.commands.run("dmesg")
    assert d.exit_code == 1 and "Operation not permitted" in d.stderr and d.stdout == ""


def test_commands_inherit_no_stray_fds(shared_sb):
    code = ("import os\nwith os.scandir('/proc/self/fd') as it:\n"
            "    links = sorted((int(e.name), os.readlink(e.path)) for e in it)\n"
            "print(' '.join(f'{n}={t}' for n, t in links))")
    for kw in ({}, {"user": "nobody"}, {"stdin": "x"}):
        out = shared_sb.commands.run(["python3", "-c", code], **kw).stdout.split()
        links = dict(x.split("=", 1) for x in out)
        assert list(links) == ["0", "1", "2", "3"], (kw, links)
        assert links["0"] == "/dev/null" or links["0"].startswith("pipe:["), links
        assert links["1"].startswith("pipe:[") and links["2"].startswith("pipe:["), links
        assert links["3"].startswith("/proc/") and links["3"].endswith("/fd"), links  # the listing itself
    # The same from a shell, and from a background command.
    assert shared_sb.commands.run("exec ls /proc/self/fd").stdout.split() == ["0", "1", "2", "3"]
    bg = shared_sb.commands.run("exec ls /proc/self/fd", background=True)
    assert bg.wait().stdout.split() == ["0", "1", "2", "3"]


def test_host_paths_and_sockets_do_not_exist_inside(shared_sb, daemon):
    host_paths = [
        str(daemon.data_dir), str(daemon.run_dir), str(daemon.run_dir / "corral.sock"),
        str(daemon.data_dir / "api-key"), str(daemon.data_dir / "sandboxes" / shared_sb.id / "run" / "agent.sock"),
        str(daemon.data_dir.parent), "/var/lib/corral", "/run/corral", "/var/cache/corral-test",
        str(Path(__file__).resolve().parents[2]),  # this repository
        "/run/docker.sock", "/var/run/docker.sock", "/run/containerd/containerd.sock", "/run/crun",
    ]
    assert all(os.path.exists(p) for p in host_paths[:5])  # they exist on the host
    r = attack(shared_sb, """
        paths = json.loads(sys.argv[1])
        done(present=[p for p in paths if os.path.lexists(p)],
             unix=[l.split()[-1] for l in open("/proc/net/unix").read().splitlines()[1:] if len(l.split()) > 7])
    """, __import__("json").dumps(host_paths))
    assert r == {"present": [], "unix": []}  # no path on the host, no named socket in this net namespace


def test_host_secrets_never_appear_inside(shared_sb, daemon):
    token = f"corral-escape-secret-{secrets.token_hex(8)}"
    planted = [daemon.data_dir / "escape-secret", Path("/tmp") / f"{token}.txt"]
    for p in planted:
        p.write_text(token)
    try:
        r = shared_sb.commands.run(
            ["sh", "-c", 'grep -rlsF -D skip -- "$T" $(ls -d /* /.corral | grep -vxE "/(proc|sys|dev)"); echo rc=$?'],
            env={"T": token})  # argv and environ live under /proc, which is not searched
        assert r.stdout == "rc=1\n", r  # grep: 1 = searched everything, found nothing
        assert token not in shared_sb.commands.run("cat /etc/shadow /root/.bash_history 2>&1; env").stdout
    finally:
        for p in planted:
            p.unlink()


def test_symlinks_to_host_paths_resolve_inside_the_sandbox(shared_sb, daemon, tmp_path):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host secret")
    target_dir = daemon.data_dir / f"escape-{secrets.token_hex(4)}"
    target_dir.mkdir()
    try:
        r = shared_sb.commands.run(f"ln -sfn {secret} /tmp/to-host-file && ln -sfn {target_dir} /tmp/to-host-dir "
                                   f"&& ln -sfn /proc/1/root{secret} /tmp/via-proc-root && echo linked")
        assert r.stdout == "linked\n"
        # Download through a link: the agent resolves it inside the sandbox, where the target is absent.
        for link in ("/tmp/to-host-file", "/tmp/via-proc-root"):
            with pytest.raises(FileNotFoundInSandboxError):
                shared_sb.files.read(link)
        # Upload through a link to a host directory: refused (the link dangles inside) or, once the
        # directory exists inside, lands inside the sandbox; never on the host.
        try:
            shared_sb.files.write("/tmp/to-host-dir/planted.txt", b"from the sandbox")
        except CorralError:
            pass
        assert list(target_dir.iterdir()) == []
        shared_sb.commands.run(f"mkdir -p {target_dir}")
        shared_sb.files.write("/tmp/to-host-dir/planted.txt", b"from the sandbox")
        shared_sb.files.write("/tmp/to-host-file", b"overwritten?")
        assert list(target_dir.iterdir()) == []
        assert secret.read_text() == "host secret"
        inside = shared_sb.commands.run(f"cat {target_dir}/planted.txt").stdout
        assert inside == "from the sandbox"
    finally:
        for p in target_dir.iterdir():
            p.unlink()
        target_dir.rmdir()


@pytest.fixture
def neighbour(daemon, base):  # type: ignore[no-untyped-def]
    sb = Sandbox.create(template=base)
    yield sb
    sb.kill()


def test_tmp_and_shm_are_per_sandbox(shared_sb, neighbour):
    token = secrets.token_hex(8)
    r = shared_sb.commands.run(f"echo {token} > /tmp/shared-{token} && echo {token} > /dev/shm/shared-{token} "
                               f"&& echo {token} > /workspace/shared-{token} 2>/dev/null; echo done")
    assert r.stdout == "done\n"
    n = neighbour.commands.run(f"ls /tmp/shared-{token} /dev/shm/shared-{token} /workspace/shared-{token} 2>&1; "
                               f"grep -rl {token} /tmp /dev/shm /workspace 2>/dev/null; echo rc=$?")
    assert n.stdout.count("No such file or directory") == 3 and n.stdout.endswith("rc=1\n"), n.stdout


def test_download_of_a_file_whose_size_lies_is_clean(shared_sb, daemon):
    with daemon.http() as h:  # its own connection, so a broken one cannot leak into other tests
        r = h.get(f"/sandboxes/{shared_sb.id}/files", params={"path": "/proc/self/status"})
        assert r.status_code == 200
        body = r.content
        assert h.get("/health").status_code == 200  # the same connection still works
    assert b"Seccomp:" in body


def _setid_files(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                out.append(os.path.join(dirpath, name))
    return out


def test_no_setuid_file_of_a_sandbox_lands_on_the_host(daemon, base):
    """Layers lie on the host's own file system, owned by the sandboxes' uid: a setuid file there
    would let any local user become that uid (and so own every sandbox's layers). Templates (also
    those built before this rule: the daemon clears them at start) and snapshot blobs carry none;
    inside, the bits never mattered (no_new_privs)."""
    from tests.conftest import TEMPLATE_CACHE

    assert _setid_files(TEMPLATE_CACHE / "base" / "rootfs") == []
    sb = Sandbox.create(template=base)
    try:
        r = sb.commands.run("cp /bin/sleep /root/mine && chmod 6755 /root/mine && stat -c %a /root/mine")
        assert r.stdout == "6755\n", r.stderr  # root inside may set it on its own layer (a nosuid mount)
        snap = sb.snapshot()
    finally:
        sb.kill()
    try:
        assert _setid_files(daemon.data_dir / "snapshots") == []
        fork = Sandbox.create(from_snapshot=snap)
        try:
            assert fork.commands.run("stat -c %a /root/mine").stdout == "755\n"
        finally:
            fork.kill()
    finally:
        from corral import Snapshots

        Snapshots.delete(snap)
