"""Kernel attack surface from inside a sandbox: mounts, namespaces, dangerous syscalls, sockets,
terminal injection, device nodes, foreign ABIs, and the privilege state a process starts with.

ATTACKS.md rows C2-C4, C6-C14, C16-C18, E9-E10, B5-B6. Every attack is run from the sandbox's own
python3 through raw syscalls and asserts the exact errno, then that nothing changed.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

from corral.policy import defaults
from tests.escape.escape_support import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWTIME,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    NR,
    attack,
)

NS_FLAGS = {
    "NEWNS|NEWUSER": CLONE_NEWNS | CLONE_NEWUSER,
    "NEWUSER": CLONE_NEWUSER,
    "NEWNS": CLONE_NEWNS,
    "NEWNET": CLONE_NEWNET,
    "NEWPID": CLONE_NEWPID,
    "NEWIPC": CLONE_NEWIPC,
    "NEWUTS": CLONE_NEWUTS,
    "NEWCGROUP": CLONE_NEWCGROUP,
    "NEWTIME": CLONE_NEWTIME,
}


# ---- mounts (C4, C6, A6) -----------------------------------------------------------------------

def test_mount_syscall_is_denied_and_mounts_nothing(shared_sb):
    r = attack(shared_sb, f"""
        os.makedirs("/tmp/mnt-target", exist_ok=True)
        open("/tmp/mnt-target/marker", "w").close()
        before = mountpoints()
        def mount(src, dst, fstype, flags, data):
            return sc({NR["mount"]}, src, dst, fstype, flags, data)
        res = dict(
            tmpfs=mount(b"none", b"/tmp/mnt-target", b"tmpfs", 0, b"size=1m"),
            proc=mount(b"proc", b"/tmp/mnt-target", b"proc", 0, None),
            sysfs=mount(b"sysfs", b"/tmp/mnt-target", b"sysfs", 0, None),
            # CVE-2022-0492: a cgroup v1 hierarchy with a writable release_agent
            cgroup=mount(b"cgroup", b"/tmp/mnt-target", b"cgroup", 0, b"rdma"),
            bind_root=mount(b"/", b"/tmp/mnt-target", None, 4096 | 16384, None),  # MS_BIND|MS_REC
            # drop read-only from the agent's runtime: MS_REMOUNT|MS_BIND
            remount_rt_rw=mount(None, b"/.corral/rt", None, 32 | 4096, None),
            remount_root_rw=mount(None, b"/", None, 32, None),
            make_shared=mount(None, b"/", None, 1 << 20, None),  # MS_SHARED
        )
        done(res=res, unchanged=mountpoints() == before,
             marker_visible=os.listdir("/tmp/mnt-target") == ["marker"])
    """)
    assert r == {"res": dict.fromkeys(("tmpfs", "proc", "sysfs", "cgroup", "bind_root", "remount_rt_rw",
                                       "remount_root_rw", "make_shared"), "EPERM"),
                 "unchanged": True, "marker_visible": True}


def test_mount_command_is_denied(shared_sb):
    r = shared_sb.commands.run("mkdir -p /tmp/m && touch /tmp/m/marker && mount -t tmpfs none /tmp/m; echo rc=$?; "
                               "ls /tmp/m; grep -c ' /tmp/m ' /proc/self/mountinfo")
    assert r.stdout == "rc=32\nmarker\n0\n", r
    assert "mount: /tmp/m: permission denied." in r.stderr


def test_new_mount_api_is_denied(shared_sb):
    r = attack(shared_sb, f"""
        before = mountpoints()
        attr = (ctypes.c_uint64 * 4)(0, 1, 0, 0)  # mount_attr: clear MOUNT_ATTR_RDONLY
        res = dict(
            fsopen=sc({NR["fsopen"]}, b"tmpfs", 0),
            fspick=sc({NR["fspick"]}, -100, b"/", 0),
            open_tree=sc({NR["open_tree"]}, -100, b"/", 1),  # OPEN_TREE_CLONE
            move_mount=sc({NR["move_mount"]}, -100, b"/.corral/rt", -100, b"/tmp", 0),
            fsconfig=sc({NR["fsconfig"]}, 3, 6, None, None, 0),  # FSCONFIG_CMD_CREATE
            fsmount=sc({NR["fsmount"]}, 3, 0, 0),
            mount_setattr=sc({NR["mount_setattr"]}, -100, b"/.corral/rt", 0, ctypes.byref(attr), 32),
        )
        done(res=res, unchanged=mountpoints() == before)
    """)
    assert r == {"res": dict.fromkeys(("fsopen", "fspick", "open_tree", "move_mount", "fsconfig", "fsmount",
                                       "mount_setattr"), "EPERM"), "unchanged": True}


def test_umount_cannot_unmask_paths(shared_sb):
    r = attack(shared_sb, f"""
        before = mountpoints()
        res = {{p: sc({NR["umount2"]}, p.encode(), 2) for p in
               ("/proc/kallsyms", "/proc/sys", "/sys/firmware", "/.corral/rt", "/dev/shm")}}  # MNT_DETACH
        done(res=res, unchanged=mountpoints() == before, kallsyms=len(open("/proc/kallsyms").read()))
    """)
    assert r == {"res": dict.fromkeys(("/proc/kallsyms", "/proc/sys", "/sys/firmware", "/.corral/rt", "/dev/shm"),
                                      "EPERM"), "unchanged": True, "kallsyms": 0}


# ---- namespaces (C2, C3) -----------------------------------------------------------------------

def test_unshare_is_denied_for_every_namespace(shared_sb):
    r = attack(shared_sb, f"""
        names = ("mnt", "user", "net", "pid", "ipc", "uts", "cgroup", "time")
        before = {{n: ns(n) for n in names}}
        flags = {NS_FLAGS!r}
        res = {{k: sc({NR["unshare"]}, v) for k, v in flags.items()}}
        done(res=res, unchanged={{n: ns(n) for n in names}} == before)
    """)
    assert r == {"res": dict.fromkeys(NS_FLAGS, "EPERM"), "unchanged": True}


def test_unshare_command_is_denied(shared_sb):
    r = shared_sb.commands.run("unshare -Urm touch /tmp/unshare-ran; echo rc=$?; ls /tmp/unshare-ran")
    assert r.stdout == "rc=1\n"
    assert "unshare: unshare failed: Operation not permitted" in r.stderr
    assert "No such file or directory" in r.stderr  # the payload never ran


def test_clone_with_namespace_flags_is_denied(shared_sb):
    r = attack(shared_sb, f"""
        flags = {NS_FLAGS!r}
        res = {{}}
        for k, v in flags.items():
            res[k] = sc({NR["clone"]}, v | 17, 0, 0, 0, 0)  # | SIGCHLD, fork-like
            if LAST == 0:
                os._exit(0)  # the child of a clone that should not have happened
        try:
            children = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children = None
        done(res=res, children=children)
    """)
    assert r == {"res": dict.fromkeys(NS_FLAGS, "EPERM"), "children": None}


def test_clone3_is_enosys_and_fork_still_works(shared_sb):
    r = attack(shared_sb, f"""
        user_ns = ns("user")
        args = (ctypes.c_uint64 * 11)()
        args[0] = {CLONE_NEWUSER | CLONE_NEWNS}  # flags
        args[4] = 17  # exit_signal = SIGCHLD
        res = dict(clone3_newuser=sc({NR["clone3"]}, ctypes.byref(args), 88),
                   clone3_null=sc({NR["clone3"]}, None, 0))
        if LAST == 0:
            os._exit(0)
        pid = os.fork()  # glibc falls back to clone(2)
        if pid == 0:
            os._exit(7)
        _, st = os.waitpid(pid, 0)
        done(res=res, fork_exit=os.waitstatus_to_exitcode(st), user_ns=ns("user") == user_ns)
    """)
    assert r == {"res": {"clone3_newuser": "ENOSYS", "clone3_null": "ENOSYS"}, "fork_exit": 7, "user_ns": True}


def test_setns_pivot_root_and_chroot_are_denied(shared_sb):
    r = attack(shared_sb, f"""
        names = ("mnt", "user", "net", "pid", "ipc", "uts", "cgroup")
        before = {{n: ns(n) for n in names}}
        res = {{}}
        for n in names:
            fd = os.open(f"/proc/self/ns/{{n}}", os.O_RDONLY)
            res["setns_" + n] = sc({NR["setns"]}, fd, 0)
        pidfd = libc.syscall(ctypes.c_long({NR["pidfd_open"]}), ctypes.c_long(1), ctypes.c_long(0))
        res["setns_pidfd_of_pid1"] = sc({NR["setns"]}, pidfd, {CLONE_NEWNS | CLONE_NEWUSER})
        os.makedirs("/tmp/newroot/old", exist_ok=True)
        res["pivot_root"] = sc({NR["pivot_root"]}, b"/tmp/newroot", b"/tmp/newroot/old")
        res["chroot"] = sc({NR["chroot"]}, b"/tmp/newroot")
        done(res=res, unchanged={{n: ns(n) for n in names}} == before, root=os.readlink("/proc/self/root"),
             etc_visible=os.path.exists("/etc/os-release"))
    """)
    expected = {f"setns_{n}": "EPERM" for n in ("mnt", "user", "net", "pid", "ipc", "uts", "cgroup")}
    expected |= {"setns_pidfd_of_pid1": "EPERM", "pivot_root": "EPERM", "chroot": "EPERM"}
    assert r == {"res": expected, "unchanged": True, "root": "/", "etc_visible": True}


# ---- dangerous syscalls (C7-C11, C13, C14, C21, B5) ---------------------------------------------

def test_kernel_surface_syscalls_are_denied(shared_sb):
    # Arguments are valid where it matters, so a missing seccomp rule shows as OK or a different
    # errno, and harmless where the call itself could do damage (reboot with a bad magic).
    r = attack(shared_sb, f"""
        buf = ctypes.create_string_buffer(4096)
        bpf_attr = (ctypes.c_uint32 * 30)(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
        perf_attr = (ctypes.c_uint32 * 32)()
        perf_attr[0], perf_attr[1] = 1, 128  # PERF_TYPE_SOFTWARE, size; config 0 = cpu-clock
        uring_params = (ctypes.c_uint32 * 30)()
        handle = (ctypes.c_uint32 * 34)(128)
        mount_id = ctypes.c_int()
        res = dict(
            bpf=sc({NR["bpf"]}, 0, ctypes.byref(bpf_attr), 120),  # BPF_MAP_CREATE
            bpf_prog_detach=sc({NR["bpf"]}, 9, ctypes.byref(bpf_attr), 120),
            perf_event_open=sc({NR["perf_event_open"]}, ctypes.byref(perf_attr), 0, -1, -1, 0),
            userfaultfd=sc({NR["userfaultfd"]}, 0),
            io_uring_setup=sc({NR["io_uring_setup"]}, 1, ctypes.byref(uring_params)),
            io_uring_enter=sc({NR["io_uring_enter"]}, 0, 1, 0, 0, None, 0),
            io_uring_register=sc({NR["io_uring_register"]}, 0, 0, None, 0),
            keyctl_get_user=sc({NR["keyctl"]}, 0, -4, 1),  # KEYCTL_GET_KEYRING_ID @u, create
            keyctl_read_session=sc({NR["keyctl"]}, 11, -3, buf, 4096),  # KEYCTL_READ @s
            add_key=sc({NR["add_key"]}, b"user", b"corral-escape", b"secret", 6, -3),
            request_key=sc({NR["request_key"]}, b"user", b"corral-escape", None, 0),
            init_module=sc({NR["init_module"]}, buf, 64, b""),
            finit_module=sc({NR["finit_module"]}, os.open("/etc/hostname", os.O_RDONLY), b"", 0),
            delete_module=sc({NR["delete_module"]}, b"corral_nope", 0o4000),
            kexec_load=sc({NR["kexec_load"]}, 0, 0, None, 0),
            kexec_file_load=sc({NR["kexec_file_load"]}, -1, -1, 0, b"", 4),  # KEXEC_FILE_NO_INITRAMFS
            iopl=sc({NR["iopl"]}, 3),
            ioperm=sc({NR["ioperm"]}, 0x80, 1, 1),
            name_to_handle_at=sc({NR["name_to_handle_at"]}, -100, b"/etc", ctypes.byref(handle),
                                 ctypes.byref(mount_id), 0),
            open_by_handle_at=sc({NR["open_by_handle_at"]}, os.open("/", os.O_RDONLY), ctypes.byref(handle), 0),
            syslog=sc({NR["syslog"]}, 3, buf, 4096),  # SYSLOG_ACTION_READ_ALL
            kcmp=sc({NR["kcmp"]}, os.getpid(), 1, 0, 0, 0),
            uselib=sc({NR["uselib"]}, b"/usr/lib/x86_64-linux-gnu/libc.so.6"),
            swapon=sc({NR["swapon"]}, b"/tmp/swap", 0),
            reboot=sc({NR["reboot"]}, 0, 0, 0, None),  # bad magic: EINVAL if it ever got through
            personality=sc({NR["personality"]}, 0x0400000),  # READ_IMPLIES_EXEC
            acct=sc({NR["acct"]}, b"/tmp/acct"),
            settimeofday=sc({NR["settimeofday"]}, None, None),
            ptrace_traceme=sc({NR["ptrace"]}, 0, 0, 0, 0),
        )
        done(res=res, uffd_dev=os.path.exists("/dev/userfaultfd"), acct_file=os.path.exists("/tmp/acct"))
    """)
    names = ("bpf", "bpf_prog_detach", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
             "io_uring_register", "keyctl_get_user", "keyctl_read_session", "add_key", "request_key",
             "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "iopl", "ioperm",
             "name_to_handle_at", "open_by_handle_at", "syslog", "kcmp", "uselib", "swapon", "reboot",
             "personality", "acct", "settimeofday", "ptrace_traceme")
    assert r == {"res": dict.fromkeys(names, "EPERM"), "uffd_dev": False, "acct_file": False}


def test_foreign_syscall_abis_kill_the_process(shared_sb):
    # C16: an x86_64-only filter must not be sidestepped through the i386 (int 0x80) or x32 ABIs.
    r = attack(shared_sb, f"""
        import mmap, signal
        def in_child(fn):
            pid = os.fork()
            if pid == 0:
                fn()
                os._exit(0)
            return os.waitpid(pid, 0)[1]
        def x32():
            # x32 unshare(CLONE_NEWUSER): same number with __X32_SYSCALL_BIT
            libc.syscall(ctypes.c_long(0x40000000 | {NR["unshare"]}), ctypes.c_long({CLONE_NEWUSER}))
        def i386():
            # i386 unshare is 310: mov eax, 310; mov ebx, CLONE_NEWUSER; int 0x80; ret
            code = b"\\xb8" + (310).to_bytes(4, "little") + b"\\xbb" + ({CLONE_NEWUSER}).to_bytes(4, "little") + \\
                b"\\xcd\\x80\\xc3"
            buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            buf.write(code)
            ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))()
        res = {{}}
        for name, fn in (("x32", x32), ("i386", i386)):
            st = in_child(fn)
            res[name] = signal.Signals(os.WTERMSIG(st)).name if os.WIFSIGNALED(st) else f"exit {{os.WEXITSTATUS(st)}}"
        done(res=res)
    """)
    assert r == {"res": {"x32": "SIGSYS", "i386": "SIGSYS"}}


# ---- sockets (E9, E10) -------------------------------------------------------------------------

def test_raw_packet_and_exotic_sockets_are_denied(shared_sb):
    r = attack(shared_sb, """
        def sock(family, type_, proto=0):
            try:
                socket.socket(family, type_, proto).close()
                return "OK"
            except OSError as e:
                return ename(e.errno)
        def pair(family, type_):
            try:
                a, b = socket.socketpair(family, type_)
                a.close(); b.close()
                return "OK"
            except OSError as e:
                return ename(e.errno)
        res = dict(
            packet_dgram=sock(17, 2),
            packet_raw=sock(17, 3, 0x0300),
            inet_raw_icmp=sock(2, 3, 1),
            inet_raw_cloexec=sock(2, 3 | 0x80000, 255),
            inet6_raw=sock(10, 3, 58),
            inet_sock_packet=sock(2, 10),
            vsock=sock(40, 1),
            alg=sock(38, 5),
            xdp=sock(44, 2),
            bluetooth=sock(31, 1),
            pf_key=sock(15, 2),
            family_46=sock(46, 2),
            family_high_bits=sc(41, 0x100000011, 2, 0),  # AF_PACKET with bits above 32 set
            socketpair_packet=pair(17, 2),
            ping_icmp=sock(2, 2, 1),
            netlink_raw=sock(16, 3, 0),  # allowed on purpose: getifaddrs() needs it; netns-scoped
        )
        done(res=res)
    """)
    assert r == {"res": {
        "packet_dgram": "EAFNOSUPPORT", "packet_raw": "EAFNOSUPPORT", "inet_raw_icmp": "EPERM", "inet_raw_cloexec": "EPERM",
        "inet6_raw": "EPERM", "inet_sock_packet": "EPERM", "vsock": "EAFNOSUPPORT", "alg": "EAFNOSUPPORT",
        "xdp": "EAFNOSUPPORT", "bluetooth": "EAFNOSUPPORT", "pf_key": "EAFNOSUPPORT", "family_46": "EAFNOSUPPORT",
        "family_high_bits": "EAFNOSUPPORT", "socketpair_packet": "EAFNOSUPPORT",
        "ping_icmp": "EACCES",  # ping_group_range of the sandbox's own netns excludes everyone
        "netlink_raw": "OK",
    }}


# ---- terminal injection (C17, I2) --------------------------------------------------------------

TIOCSTI_ATTACK = textwrap.dedent("""
    import fcntl, tty
    # A pty that is this process's controlling terminal: the one case the kernel's own TIOCSTI
    # check allows, so only the seccomp rule stands between the attack and injected input.
    master, slave = os.openpty()
    tty.setraw(slave)
    fcntl.ioctl(slave, 0x540E, 0)  # TIOCSCTTY (commands run as session leaders)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p]
    def ioctl(req, arg):
        ctypes.set_errno(0)
        return "OK" if libc.ioctl(slave, req, arg) == 0 else ename(ctypes.get_errno())
    res = {k: ioctl(req, b"Z") for k, req in REQUESTS.items()}
    os.set_blocking(slave, False)
    try:
        injected = os.read(slave, 100).decode()
    except BlockingIOError:
        injected = ""
    done(res=res, injected=injected)
""")


def test_tiocsti_and_tioclinux_are_denied(shared_sb):
    r = attack(shared_sb, "REQUESTS = {'TIOCSTI': 0x5412, 'TIOCLINUX': 0x541C}\n" + TIOCSTI_ATTACK)
    assert r == {"res": {"TIOCSTI": "EPERM", "TIOCLINUX": "EPERM"}, "injected": ""}


def test_tiocsti_with_high_bits_set_is_denied(shared_sb):
    # CVE-2019-10063: the kernel reads ioctl's request as 32 bits, so a 64-bit equality rule is
    # sidestepped by setting any bit above 31; the rule must compare the low 32 bits only.
    r = attack(shared_sb, "REQUESTS = {'hi32': 0x100005412, 'all_hi': 0xFFFFFFFF00005412, "
                          "'tioclinux_hi': 0x10000541C}\n" + TIOCSTI_ATTACK)
    assert r == {"res": {"hi32": "EPERM", "all_hi": "EPERM", "tioclinux_hi": "EPERM"}, "injected": ""}


# ---- device nodes (C12) ------------------------------------------------------------------------

def test_mknod_of_devices_is_denied(shared_sb):
    r = attack(shared_sb, """
        import stat
        res = dict(
            char_mem=oserr(os.mknod, "/tmp/mem", 0o600 | stat.S_IFCHR, os.makedev(1, 1)),
            char_kmsg=oserr(os.mknod, "/tmp/kmsg", 0o600 | stat.S_IFCHR, os.makedev(1, 11)),
            block_vda=oserr(os.mknod, "/tmp/vda", 0o600 | stat.S_IFBLK, os.makedev(253, 0)),
            char_dev_shm=oserr(os.mknod, "/dev/shm/mem", 0o600 | stat.S_IFCHR, os.makedev(1, 1)),
        )
        created = [p for p in ("/tmp/mem", "/tmp/kmsg", "/tmp/vda", "/dev/shm/mem") if os.path.lexists(p)]
        done(res=res, created=created)
    """)
    assert r == {"res": dict.fromkeys(("char_mem", "char_kmsg", "block_vda", "char_dev_shm"), "EPERM"),
                 "created": []}
    c = shared_sb.commands.run("mknod /tmp/mem2 c 1 1; echo rc=$?; ls /tmp/mem2")
    assert c.stdout == "rc=1\n"
    assert "Operation not permitted" in c.stderr and "No such file or directory" in c.stderr


def test_dangerous_device_nodes_are_absent(shared_sb):
    r = attack(shared_sb, """
        paths = ("/dev/kvm", "/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/fuse", "/dev/net/tun",
                 "/dev/vsock", "/dev/vhost-vsock", "/dev/userfaultfd", "/dev/vda", "/dev/sda", "/dev/console",
                 "/dev/tty0", "/dev/tty1", "/dev/loop0", "/dev/loop-control", "/dev/mapper/control")
        done(present=[p for p in paths if os.path.lexists(p)], dev=sorted(os.listdir("/dev")))
    """)
    assert r["present"] == []
    assert set(r["dev"]) <= {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue",
                             "fd", "stdin", "stdout", "stderr", "core"}, r["dev"]


# ---- privilege state (B6, C18) -----------------------------------------------------------------

CAP_BITS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
            "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
            "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
            "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17,
            "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21,
            "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23, "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25,
            "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28, "CAP_AUDIT_WRITE": 29,
            "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32, "CAP_MAC_ADMIN": 33,
            "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37,
            "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40}
NEVER = ("CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_MKNOD", "CAP_SYS_MODULE",
         "CAP_SYS_RAWIO", "CAP_DAC_READ_SEARCH", "CAP_SYS_BOOT", "CAP_SYS_TIME", "CAP_SYSLOG", "CAP_BPF",
         "CAP_PERFMON", "CAP_CHECKPOINT_RESTORE", "CAP_SYS_CHROOT", "CAP_MAC_ADMIN", "CAP_MAC_OVERRIDE",
         "CAP_SETFCAP", "CAP_LINUX_IMMUTABLE", "CAP_SYS_RESOURCE")


def _status(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def test_status_shows_seccomp_nnp_and_no_admin_caps(shared_sb):
    granted = sum(1 << CAP_BITS[c] for c in defaults.CAPABILITIES)
    for user, eff in ((None, granted), ("nobody", 0)):
        st = _status(shared_sb.commands.run("cat /proc/self/status", user=user).stdout)
        assert (st["Seccomp"], st["NoNewPrivs"], st["Seccomp_filters"]) == ("2", "1", "1"), (user, st)
        assert int(st["CapEff"], 16) == eff, (user, st["CapEff"])
        assert int(st["CapBnd"], 16) == granted and int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
        for cap in NEVER:
            assert not int(st["CapBnd"], 16) & (1 << CAP_BITS[cap]), cap
    assert not granted & (1 << 21)  # CAP_SYS_ADMIN, bit 21


def test_seccomp_nnp_and_caps_cannot_be_undone(shared_sb):
    r = attack(shared_sb, """
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        def prctl(*a):
            ctypes.set_errno(0)
            return "OK" if libc.prctl(*a) >= 0 else ename(ctypes.get_errno())
        # capset: version 3, this process; raise CAP_SYS_ADMIN in effective/permitted/inheritable
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)(1 << 21, 1 << 21, 1 << 21, 0, 0, 0)
        res = dict(
            clear_nnp=prctl(38, 0, 0, 0, 0),  # PR_SET_NO_NEW_PRIVS 0
            seccomp_disable=prctl(22, 0, 0, 0, 0),  # PR_SET_SECCOMP, SECCOMP_MODE_DISABLED
            capset_sys_admin=sc(126, ctypes.byref(hdr), ctypes.byref(data)),
            ambient_sys_admin=prctl(47, 2, 21, 0, 0),  # PR_CAP_AMBIENT_RAISE CAP_SYS_ADMIN
            write_uid_map=oserr(lambda: os.write(os.open("/proc/self/uid_map", os.O_WRONLY), b"0 0 4294967295\\n")),
            # opening setgroups for write needs CAP_SYS_ADMIN over the user namespace: EACCES
            write_setgroups=oserr(lambda: os.write(os.open("/proc/self/setgroups", os.O_WRONLY), b"allow")),
        )
        st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
        done(res=res, seccomp=st["Seccomp"].strip(), nnp=st["NoNewPrivs"].strip(),
             sys_admin=bool(int(st["CapEff"], 16) & (1 << 21)))
    """)
    assert r == {"res": {"clear_nnp": "EINVAL", "seccomp_disable": "EINVAL", "capset_sys_admin": "EPERM",
                         "ambient_sys_admin": "EPERM", "write_uid_map": "EPERM",
                         "write_setgroups": "EACCES"},
                 "seccomp": "2", "nnp": "1", "sys_admin": False}


def test_core_dumps_are_off_and_rlimits_cannot_be_raised(shared_sb):
    r = attack(shared_sb, """
        import resource
        core, nofile = resource.getrlimit(resource.RLIMIT_CORE), resource.getrlimit(resource.RLIMIT_NOFILE)
        big_core = (ctypes.c_ulong * 2)(1 << 30, 1 << 30)
        big_nofile = (ctypes.c_ulong * 2)(nofile[1] * 2, nofile[1] * 2)
        res = dict(raise_core=sc(160, resource.RLIMIT_CORE, ctypes.byref(big_core)),  # setrlimit(2)
                   raise_nofile=sc(160, resource.RLIMIT_NOFILE, ctypes.byref(big_nofile)))
        done(core=list(core), nofile=list(nofile), res=res)
    """)
    assert r["core"] == [0, 0]  # a crash cannot carry memory out as a core file (CORE_SIZE)
    assert r["nofile"][1] <= defaults.NOFILE
    assert r["res"] == {"raise_core": "EPERM", "raise_nofile": "EPERM"}  # no CAP_SYS_RESOURCE


def test_uid_map_is_the_unprivileged_range(shared_sb, daemon):
    r = shared_sb.commands.run("cat /proc/self/uid_map /proc/self/gid_map; touch /tmp/owned-by-sandbox")
    assert [ln.split() for ln in r.stdout.splitlines()] == [["0", "100000", "65536"]] * 2
    # The same file seen from the host: owned by the unprivileged host uid, not by root.
    # (The upper layer lives on a disk mounted in the daemon's namespace: look through the sandbox's root.)
    state = subprocess.run(["crun", "--root", str(daemon.run_dir / "crun"), "state", shared_sb.id],
                           capture_output=True, text=True, check=True).stdout
    st = Path(f"/proc/{json.loads(state)['pid']}/root/tmp/owned-by-sandbox").stat()
    assert (st.st_uid, st.st_gid) == (100000, 100000)
