"""Safe defaults, each with its reason. Changing one is a security decision: say why in the commit."""

from __future__ import annotations

# Resources: small enough that 100 sandboxes fit on a 2-core, 24 GiB machine.
CPU_CORES = 1.0
MEMORY_MIB = 1024
PIDS_MAX = 512  # a fork bomb stops here, EAGAIN inside, host unaffected
DISK_MIB = 10240  # the writable layer is a sparse ext4 image: filling it is ENOSPC inside only (G3)
# In-sandbox tmpfs (/dev/shm; /tmp and /run in host mode) is charged to the sandbox's memory cgroup
# and killing processes does not free it: each is capped at a quarter of the memory limit so that
# filling them cannot OOM-kill the agent (ATTACKS G5).
SHM_MAX_MIB = 64
TMP_MAX_MIB = 1024
TMPFS_FRACTION = 4
DEV_SIZE = "1m"  # /dev holds device nodes and mountpoints only
NOFILE = 65536  # enough for builds; bounded so fd exhaustion stays inside
CORE_SIZE = 0  # no core dumps: they could carry secrets out of the process

# All sandboxes map root inside to this unprivileged host range (see docs/threat-model.md: the range
# is shared, so cross-sandbox uid-keyed objects are closed by other means: keyctl is denied,
# each sandbox has its own pid/ipc/net/mount namespaces).
UID_BASE = 100000
UID_COUNT = 65536

# The sandbox's own name (UTS namespace): never the host's, which would leak it.
HOSTNAME = "sandbox"
# Debian's default search path; the template's tools live here.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Capabilities granted inside the sandbox's user namespace only (they mean nothing on the host).
# Root inside can own files, change uid for `su`-style tools, bind low ports and signal its own
# processes; no SYS_ADMIN, NET_ADMIN, NET_RAW, SYS_PTRACE, MKNOD or SYS_MODULE.
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_AUDIT_WRITE",
)

# Kernel interfaces that leak host state or addresses (C21): hidden behind an empty mount.
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/proc/kallsyms",
    "/sys/firmware", "/sys/kernel/debug", "/sys/devices/virtual/powercap",
)
# Kernel tunables and triggers that would reach beyond the sandbox if written (C5, C6).
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# Syscalls denied by the default seccomp profile: (name, errno, reason). Everything else is allowed
# (a denylist keeps ordinary software working; the user namespace already strips host privilege).
EPERM = 1
ENOSYS = 38
DENIED_SYSCALLS: tuple[tuple[str, int, str], ...] = (
    ("mount", EPERM, "new mounts could hide or reveal filesystem state (ATTACKS C4)"),
    ("umount2", EPERM, "unmounting could expose what masked paths hide (C4)"),
    ("pivot_root", EPERM, "changing the root is the runtime's job only (C3)"),
    ("chroot", EPERM, "chroot tricks combine with fd leaks to escape (C3)"),
    ("fsopen", EPERM, "new mount API (C4)"),
    ("fsconfig", EPERM, "new mount API (C4)"),
    ("fsmount", EPERM, "new mount API (C4)"),
    ("fspick", EPERM, "new mount API (C4)"),
    ("open_tree", EPERM, "new mount API: clones mounts (C4)"),
    ("move_mount", EPERM, "new mount API (C4)"),
    ("mount_setattr", EPERM, "could drop read-only or idmap flags (C4)"),
    ("unshare", EPERM, "nested namespaces widen the kernel attack surface (C2)"),
    ("setns", EPERM, "joining namespaces through leaked fds (C3)"),
    ("clone3", ENOSYS, "seccomp cannot inspect clone3's flags struct; libc falls back to clone (C2)"),
    ("bpf", EPERM, "BPF programs are kernel attack surface and could tamper with enforcement (C8, B5)"),
    ("perf_event_open", EPERM, "side channels and kernel attack surface (C9)"),
    ("ptrace", EPERM, "tracing could tamper with the agent or other processes (C1)"),
    ("process_vm_readv", EPERM, "cross-process memory reads (C1)"),
    ("process_vm_writev", EPERM, "cross-process memory writes (C1)"),
    ("kcmp", EPERM, "kernel pointer comparisons leak layout"),
    ("pidfd_getfd", EPERM, "stealing file descriptors from other processes (C15)"),
    ("keyctl", EPERM, "kernel keyrings are shared per uid across sandboxes (C7)"),
    ("add_key", EPERM, "kernel keyrings (C7)"),
    ("request_key", EPERM, "kernel keyrings (C7)"),
    ("userfaultfd", EPERM, "race-widening primitive for kernel exploits (C10)"),
    ("io_uring_setup", EPERM, "io_uring operations bypass seccomp (C11)"),
    ("io_uring_enter", EPERM, "io_uring (C11)"),
    ("io_uring_register", EPERM, "io_uring (C11)"),
    ("kexec_load", EPERM, "replacing the kernel (C13)"),
    ("kexec_file_load", EPERM, "replacing the kernel (C13)"),
    ("init_module", EPERM, "kernel modules (C13)"),
    ("finit_module", EPERM, "kernel modules (C13)"),
    ("delete_module", EPERM, "kernel modules (C13)"),
    ("iopl", EPERM, "raw port I/O (C13)"),
    ("ioperm", EPERM, "raw port I/O (C13)"),
    ("open_by_handle_at", EPERM, "file-handle 'shocker' escape (C14)"),
    ("name_to_handle_at", EPERM, "file handles pair with open_by_handle_at (C14)"),
    ("uselib", EPERM, "obsolete loader path that skips normal exec checks"),
    ("swapon", EPERM, "host swap configuration"),
    ("swapoff", EPERM, "host swap configuration"),
    ("reboot", EPERM, "no reason to reboot from inside a sandbox"),
    ("syslog", EPERM, "kernel log leaks addresses (C21)"),
    ("acct", EPERM, "process accounting is host configuration"),
    ("quotactl", EPERM, "host quota configuration"),
    ("lookup_dcookie", EPERM, "kernel profiling interface"),
    ("settimeofday", EPERM, "the clock is shared with the host"),
    ("clock_settime", EPERM, "the clock is shared with the host"),
    ("clock_adjtime", EPERM, "the clock is shared with the host"),
    ("adjtimex", EPERM, "the clock is shared with the host"),
    ("vhangup", EPERM, "terminal hangups reach beyond the sandbox's session"),
    ("nfsservctl", EPERM, "obsolete kernel NFS server control"),
    ("personality", EPERM, "READ_IMPLIES_EXEC and ADDR_NO_RANDOMIZE weaken exploit mitigations"),
)

# ioctl requests denied on any fd: terminal input injection (C17).
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
DENIED_IOCTLS: tuple[tuple[int, str], ...] = (
    (TIOCSTI, "TIOCSTI pushes input into a terminal another process reads (C17)"),
    (TIOCLINUX, "TIOCLINUX can inject console selections (C17)"),
)

# clone() flags that create namespaces; clone with any of them is denied (C2).
CLONE_NAMESPACE_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
    | 0x00000080  # CLONE_NEWTIME
)

# Socket families a sandbox may create; others (AF_PACKET, AF_NETLINK raw routing changes are
# netns-scoped, AF_VSOCK, AF_ALG, AF_XDP, AF_BLUETOOTH...) get EAFNOSUPPORT-like EPERM (E9, E10).
ALLOWED_SOCKET_FAMILIES = (1, 2, 10, 16)  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
