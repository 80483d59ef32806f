"""Getting around the exec policy (ATTACKS.md 3.A, rows A1-A21), in enforce mode.

One sandbox of the base template denies `curl` by content hash. Every attack tries to get curl's
code running some other way; each asserts the refusal (EPERM or the shell's 126), that curl's code
did not run (its banner never appears), and the audit record of the decision (path as the kernel
saw it, sha256, rule). python3, bash and coreutils stay allowed, so the attacks are ordinary scripts.
"""

from __future__ import annotations

import hashlib
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.escape.escape_support import attack, inside

BANNER = "curl 7."  # `curl --version` prints it: its appearance means curl's code ran


@pytest.fixture(scope="module")
def guarded(daemon, base) -> Any:  # type: ignore[no-untyped-def]
    from corral import Sandbox

    sb = Sandbox.create(template=base, exec_policy={"mode": "enforce", "deny": ["curl"]})
    yield sb
    sb.kill()


@pytest.fixture(scope="module")
def curl_sha(daemon, guarded) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256(inside(daemon, guarded, "/usr/bin/curl").read_bytes()).hexdigest()


def denials(sb: Any, since_seq: int) -> list[dict[str, Any]]:
    return [r.detail | {"seq": r.seq, "result": r.result} for r in sb.audit.list(kind="exec.decision", after=since_seq)
            if r.result == "deny"]


def last_seq(sb: Any) -> int:
    recs = sb.audit.list(limit=10000)
    return recs[-1].seq if recs else 0


def assert_denied(sb: Any, cmd: str, curl_sha: str, path: str | None = None, rule: str = "deny:curl") -> Any:
    before = last_seq(sb)
    r = sb.commands.run(cmd)
    assert r.exit_code == 126, (cmd, r)
    assert BANNER not in r.stdout, (cmd, r.stdout)
    assert "Operation not permitted" in r.stderr, (cmd, r.stderr)
    got = denials(sb, before)
    assert got, f"no denial was audited for {cmd!r}"
    want = [d for d in got if d["rule"] == rule and (rule != "deny:curl" or d["sha256"] == curl_sha)]
    assert want, (cmd, got)
    if path is not None:
        assert any(d["path"] == path for d in want), (cmd, want)
    assert all(isinstance(d["pid"], int) and d["pid"] > 1 for d in want)
    # the same denials come back with the command's result, linked to their audit records
    assert {(d.rule, d.audit_seq) for d in r.denials} >= {(d["rule"], d["seq"]) for d in want}
    return r


def test_a1_direct_exec(guarded, curl_sha):
    r = assert_denied(guarded, "curl --version", curl_sha, path="/usr/bin/curl")
    assert r.denials[0].sha256 == curl_sha and r.denials[0].verdict == "deny"
    # argv form: the denial is data (exit 126 and the rule), not an error
    r = guarded.commands.run(["curl", "--version"])
    assert r.exit_code == 126 and "deny:curl" in r.stderr and r.denials and BANNER not in r.stdout


def test_allowed_programs_still_run(guarded):
    r = guarded.commands.run("ls /usr/bin >/dev/null && python3 -c 'print(6*7)' && bash -c 'echo ok'")
    assert r.exit_code == 0 and r.stdout.split() == ["42", "ok"], r
    assert r.denials == []


@pytest.mark.parametrize("alias", ["/proc/self/root/usr/bin/curl", "/proc/self/root/proc/self/root/bin/curl",
                                   "/bin/curl", "/usr/bin/../bin/curl"])
def test_a2_a3_path_aliases(guarded, curl_sha, alias):
    assert_denied(guarded, f"{alias} --version", curl_sha)


def test_a3_proc_1_root(guarded):
    # PID 1 is the non-dumpable agent: its root link is refused before any exec is attempted.
    r = guarded.commands.run("/proc/1/root/usr/bin/curl --version")
    assert r.exit_code == 126 and "Permission denied" in r.stderr and BANNER not in r.stdout


def test_a3_cwd_and_fd_magic_links(guarded, curl_sha):
    assert_denied(guarded, "cd /usr/bin && /proc/self/cwd/curl --version", curl_sha)
    r = attack(guarded, """
        fd = os.open("/usr/bin/curl", os.O_PATH)
        fd2 = os.open("/usr/bin/curl", os.O_RDONLY)
        out = {}
        for name, path in (("opath", f"/proc/self/fd/{fd}"), ("rdonly", f"/proc/self/fd/{fd2}")):
            pid = os.fork()
            if pid == 0:
                try:
                    os.execv(path, [path, "--version"])
                except OSError as e:
                    os._exit(e.errno)
            out[name] = ename(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        done(**out)
    """)
    assert r == {"opath": "EPERM", "rdonly": "EPERM"}


def test_a4_symlink_chains(guarded, curl_sha):
    assert_denied(guarded, "cd /tmp && ln -sf /usr/bin/curl l0 && for i in $(seq 1 19); do ln -sf l$((i-1)) l$i; done"
                           " && /tmp/l19 --version", curl_sha)
    assert_denied(guarded, "mkdir -p /tmp/a/b && ln -sf ../../../usr/bin/curl /tmp/a/b/rel && /tmp/a/b/rel --version",
                  curl_sha)


def test_a5_hardlink(guarded, curl_sha):
    assert_denied(guarded, "ln -f /usr/bin/curl /root/hl && /root/hl --version", curl_sha, path="/root/hl")
    assert_denied(guarded, "mkdir -p /workspace && ln -f /usr/bin/curl /workspace/hl && /workspace/hl --version",
                  curl_sha, path="/workspace/hl")


def test_a6_bind_mount_refused_and_exec_still_denied(guarded, curl_sha):
    r = guarded.commands.run("mkdir -p /tmp/m && mount --bind /usr/bin /tmp/m; echo rc=$?")
    assert "rc=0" not in r.stdout and "rc=" in r.stdout, r
    r = attack(guarded, """
        done(unshare=sc(272, 0x00020000), mount=sc(165, b"/usr/bin", b"/tmp/m", None, 4096, None))
    """)
    assert r == {"unshare": "EPERM", "mount": "EPERM"}
    assert_denied(guarded, "/tmp/m/curl --version 2>&1 | grep -q 'No such file' && /usr/bin/curl --version",
                  curl_sha)


@pytest.mark.parametrize("how", [
    "cp /usr/bin/curl {d}/c",
    "cat /usr/bin/curl > {d}/c && chmod +x {d}/c",
    "dd if=/usr/bin/curl of={d}/c status=none && chmod 755 {d}/c",
    "cp /usr/bin/curl {d}/x && mv {d}/x {d}/c",
    "python3 -c 'import shutil; shutil.copy(\"/usr/bin/curl\", \"{d}/c\")'",
])
@pytest.mark.parametrize("d", ["/tmp", "/workspace", "/root", "/var/tmp"])
def test_a7_byte_identical_copies(guarded, curl_sha, how, d):
    assert_denied(guarded, f"mkdir -p {d} && rm -f {d}/c && " + how.format(d=d) + f" && {d}/c --version",
                  curl_sha, path=f"{d}/c")


def test_a7_dev_shm_and_dev_are_noexec(guarded):
    for d in ("/dev/shm", "/dev"):
        r = guarded.commands.run(f"cp /usr/bin/true {d}/t && {d}/t; echo rc=$?")
        assert "rc=126" in r.stdout and "Permission denied" in r.stderr, (d, r)


def test_a8_modified_copy_runs_in_denylist_mode(guarded, curl_sha):
    # Documented gap (docs/threat-model.md): a denylist names content; changed content is another
    # program. Allowlist mode refuses it (tests/integration/test_execguard.py).
    before = last_seq(guarded)
    r = guarded.commands.run("cp /usr/bin/curl /tmp/mod && printf x >> /tmp/mod && /tmp/mod --version")
    assert r.exit_code == 0 and BANNER in r.stdout
    recs = [x for x in guarded.audit.list(kind="exec.decision", after=before) if x.detail.get("path") == "/tmp/mod"]
    assert recs and recs[0].result == "allow" and recs[0].detail["sha256"] != curl_sha


def test_a9_memfd_execs(guarded):
    r = attack(guarded, """
        MFD_CLOEXEC, MFD_EXEC, MFD_NOEXEC_SEAL = 1, 0x10, 0x8
        data = open("/usr/bin/curl", "rb").read()
        out = {"sysctl": open("/proc/sys/vm/memfd_noexec").read().strip()}
        def run(fd):
            pid = os.fork()
            if pid == 0:
                try:
                    os.execve(fd, ["curl", "--version"], {})
                except OSError as e:
                    os._exit(e.errno)
            return ename(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        try:
            os.memfd_create("x", MFD_EXEC)
            out["exec"] = "created"
        except OSError as e:
            out["exec"] = ename(e.errno)
        for name, flags in (("plain", 0), ("sealed", MFD_NOEXEC_SEAL)):
            fd = os.memfd_create("x", flags)  # with memfd_noexec=2 a plain memfd is sealed non-executable too
            os.write(fd, data)
            out[name + "_chmod"] = oserr(os.fchmod, fd, 0o755)
            out[name + "_exec"] = run(fd)
        out["lower_sysctl"] = oserr(lambda: open("/proc/sys/vm/memfd_noexec", "w").write("0"))
        done(**out)
    """)
    assert r["sysctl"] == "2"
    assert r["exec"] in ("EACCES", "EPERM"), r
    for name in ("plain", "sealed"):
        assert r[name + "_exec"] == "EACCES" and r[name + "_chmod"] == "EPERM", r
    assert r["lower_sysctl"] in ("EROFS", "EACCES", "EPERM"), r


def test_a10_execveat(guarded, curl_sha):
    before = last_seq(guarded)
    r = attack(guarded, """
        AT_EMPTY_PATH = 0x1000
        def run(dirfd, path, flags):
            pid = os.fork()
            if pid == 0:
                argv = (ctypes.c_char_p * 3)(b"curl", b"--version", None)
                envp = (ctypes.c_char_p * 1)(None)
                sc(322, dirfd, path, argv, envp, flags)
                os._exit(ctypes.get_errno())
            return ename(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        d = os.open("/usr/bin", os.O_PATH | os.O_DIRECTORY)
        done(dirfd=run(d, b"curl", 0), opath=run(os.open("/usr/bin/curl", os.O_PATH), b"", AT_EMPTY_PATH),
             rdonly=run(os.open("/usr/bin/curl", os.O_RDONLY), b"", AT_EMPTY_PATH))
    """)
    assert r == {"dirfd": "EPERM", "opath": "EPERM", "rdonly": "EPERM"}
    got = [d for d in denials(guarded, before) if d["sha256"] == curl_sha]
    assert len(got) >= 3


@pytest.mark.parametrize("cmd", [
    "/lib64/ld-linux-x86-64.so.2 /usr/bin/curl --version",
    "cp /usr/bin/curl /tmp/ldc && /lib64/ld-linux-x86-64.so.2 /tmp/ldc --version",
    "/lib64/ld-linux-x86-64.so.2 --library-path /lib/x86_64-linux-gnu /usr/bin/curl --version",
    "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /usr/bin/true",
    "cp /lib64/ld-linux-x86-64.so.2 /tmp/myld && /tmp/myld /usr/bin/curl --version",
])
def test_a11_dynamic_loader_as_a_program(guarded, curl_sha, cmd):
    assert_denied(guarded, cmd, curl_sha, rule="loader")


def test_a11_corrals_own_loader_and_python_are_not_gadgets(guarded, curl_sha):
    assert_denied(guarded, "/.corral/rt/lib/ld-linux-x86-64.so.2 /usr/bin/curl --version", curl_sha,
                  rule="corral-runtime")
    assert_denied(guarded, "/.corral/rt/lib/ld-linux-x86-64.so.2 --library-path /.corral/rt/lib "
                           "/.corral/rt/bin/python3 -c 'print(1)'", curl_sha, rule="corral-runtime")


def test_a11_loader_in_a_shebang(guarded, curl_sha):
    guarded.files.write("/tmp/ldsh", "#!/lib64/ld-linux-x86-64.so.2 /usr/bin/curl\n", mode=0o755)
    assert_denied(guarded, "/tmp/ldsh --version", curl_sha, rule="loader")


def test_a13_shebang_indirection(guarded, curl_sha):
    guarded.files.write("/tmp/s1", "#!/usr/bin/curl\n", mode=0o755)
    assert_denied(guarded, "/tmp/s1 --version", curl_sha, path="/usr/bin/curl")
    guarded.files.write("/tmp/s2", "#!/usr/bin/env curl\n", mode=0o755)
    assert_denied(guarded, "/tmp/s2 --version", curl_sha)
    guarded.commands.run("cp /usr/bin/curl /tmp/copy-for-shebang")
    guarded.files.write("/tmp/s3", "#!/tmp/copy-for-shebang\n", mode=0o755)
    assert_denied(guarded, "/tmp/s3 --version", curl_sha, path="/tmp/copy-for-shebang")
    guarded.files.write("/tmp/s4", "#!/tmp/s3\n", mode=0o755)  # nested: Linux runs s3 as the interpreter
    r = guarded.commands.run("/tmp/s4 --version")
    assert r.exit_code != 0 and BANNER not in r.stdout


def test_a14_interpreter_subprocess(guarded, curl_sha):
    r = attack(guarded, """
        import subprocess
        out = {}
        try:
            subprocess.run(["curl", "--version"], capture_output=True)
            out["subprocess"] = "ran"
        except OSError as e:
            out["subprocess"] = ename(e.errno)
        out["system"] = os.waitstatus_to_exitcode(os.system("curl --version >/dev/null 2>&1"))
        done(**out)
    """)
    assert r == {"subprocess": "EPERM", "system": 126}


def test_a16_binfmt_misc_registration(guarded):
    r = attack(guarded, """
        done(register=oserr(lambda: open("/proc/sys/fs/binfmt_misc/register", "w").write(":x:M::MZ::/usr/bin/curl:")),
             mount=sc(165, b"binfmt_misc", b"/tmp", b"binfmt_misc", 0, None))
    """)
    assert r["register"] in ("ENOENT", "EROFS", "EACCES", "EPERM") and r["mount"] == "EPERM", r


RACE_PRELUDE = """
import threading
true_b = open("/usr/bin/true", "rb").read()
curl_b = open("/usr/bin/curl", "rb").read()
# Count-bound, time-capped: the race runs a fixed number of execs however loaded the machine is.
stop = time.monotonic() + 40
goal = int(sys.argv[1])
finished = False
ran_curl = execs = 0
statuses = set()
def run(path):
    # exec path --version with stdout on a pipe; count it, and whether curl's code printed
    global ran_curl, execs
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(wfd, 1); os.close(rfd)
        try:
            os.execv(path, [path, "--version"])
        except OSError as e:
            os._exit(100 + (e.errno % 100))
    os.close(wfd)
    data = os.read(rfd, 200); os.close(rfd)
    statuses.add(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    execs += 1
    if b"curl" in data:
        ran_curl += 1
def race(path, mutate):
    # mutate() changes the file under path until `finished`; exec path meanwhile, then report
    global finished
    t = threading.Thread(target=mutate); t.start()
    while execs < goal and time.monotonic() < stop:
        run(path)
    finished = True
    t.join()
    done(ran_curl=ran_curl, execs=execs, statuses=sorted(statuses))
"""


def test_a17_write_during_exec_race(guarded):
    # A writer flips a file between the bytes of `true` and of `curl`; the exec side must never get
    # curl's code running (curl --version exits 0 and prints; true exits 0 silently: tell them apart
    # by a marker curl prints that true cannot: we run with stdout to a pipe we read).
    r = attack(guarded, RACE_PRELUDE + textwrap.dedent("""
        path = "/tmp/race-w"
        open(path, "wb").write(true_b); os.chmod(path, 0o755)
        def writer():
            n = 0
            while not finished and time.monotonic() < stop:
                for data in (curl_b, true_b):
                    try:
                        with open(path, "r+b") as f:
                            f.write(data); f.truncate(len(data))
                        n += 1
                    except OSError:
                        pass
            return n
        race(path, writer)
    """), 25)
    assert r["execs"] >= 25 and r["ran_curl"] == 0, r


def test_a18_rename_swap_race(guarded):
    r = attack(guarded, RACE_PRELUDE + textwrap.dedent("""
        a, b = "/tmp/swap-a", "/tmp/swap-b"
        open(a, "wb").write(true_b); open(b, "wb").write(curl_b)
        os.chmod(a, 0o755); os.chmod(b, 0o755)
        RENAME_EXCHANGE = 2
        def swapper():
            while not finished and time.monotonic() < stop:
                libc.renameat2(-100, a.encode(), -100, b.encode(), RENAME_EXCHANGE)
        race(a, swapper)
    """), 15)
    # Each swap changes both files' ctime, so every exec is hashed afresh (after FRESH_S): few execs,
    # each decided on the content it opened: true ran (0) or curl was refused (EPERM -> 101).
    assert r["ran_curl"] == 0 and r["execs"] >= 15, r
    assert set(r["statuses"]) <= {0, 101}, r


def test_a19_cache_poisoning(guarded, curl_sha):
    r = guarded.commands.run("cp /usr/bin/true /tmp/p && /tmp/p && echo first-ok")
    assert r.exit_code == 0 and "first-ok" in r.stdout
    # rewrite in place (same inode) right after, then again after the cache has aged
    assert_denied(guarded, "cat /usr/bin/curl > /tmp/p && /tmp/p --version", curl_sha, path="/tmp/p")
    guarded.commands.run("cat /usr/bin/true > /tmp/p2 && chmod +x /tmp/p2 && /tmp/p2")
    time.sleep(1.1)
    assert guarded.commands.run("/tmp/p2").exit_code == 0
    assert_denied(guarded, "cat /usr/bin/curl > /tmp/p2 && /tmp/p2 --version", curl_sha, path="/tmp/p2")


def test_a21_huge_binary_fails_closed(guarded, curl_sha):
    before = last_seq(guarded)
    r = guarded.commands.run("cp /usr/bin/true /tmp/huge && truncate -s 4G /tmp/huge && /tmp/huge; echo rc=$?; "
                             "rm -f /tmp/huge")
    assert "rc=126" in r.stdout, r
    assert any(d["rule"] == "too-large" for d in denials(guarded, before))


def test_deep_process_trees_are_guarded(guarded, curl_sha):
    guarded.files.write("/tmp/deep.sh", "#!/bin/sh\ncurl --version\necho rc=$?\n", mode=0o755)
    r = guarded.commands.run("setsid sh -c 'nohup bash -c \"sh -c /tmp/deep.sh\" 2>&1' </dev/null")
    assert "rc=126" in r.stdout and BANNER not in r.stdout, r
    assert any(d.rule == "deny:curl" for d in r.denials)


def test_no_escape_key(guarded, curl_sha, daemon):
    """Nothing inside can stop, reconfigure or see the guard; after trying, curl is still refused."""
    r = attack(guarded, """
        FAN_CLASS_CONTENT = 4
        out = {"fanotify_init": sc(300, FAN_CLASS_CONTENT, 0)}
        procs = cmdlines()
        out["guard_visible"] = [c for c in procs.values() if "sleep infinity" in c or "execguard" in c]
        out["memfd_sysctl"] = oserr(lambda: open("/proc/sys/vm/memfd_noexec", "w").write("0"))
        out["bpf"] = sc(321, 0, 0, 0)
        out["ptrace_1"] = sc(101, 16, 1, 0, 0)
        done(**out)
    """)
    assert r["fanotify_init"] == "EPERM" and r["guard_visible"] == [], r
    assert r["memfd_sysctl"] in ("EROFS", "EACCES", "EPERM") and r["bpf"] in ("EPERM", "ENOSYS"), r
    assert r["ptrace_1"] in ("EPERM", "ENOSYS"), r
    # kill every process the sandbox can see (all but its PID 1): the guard is not among them
    guarded.commands.run("kill -9 -1; true")
    assert_denied(guarded, "curl --version", curl_sha)
    # the sandbox's own view of the daemon's holder: its pid is not in the sandbox's namespace
    holder = (Path(daemon.data_dir) / "sandboxes" / guarded.id / "run" / "guard.pid").read_text().strip()
    r = guarded.commands.run(f"kill -9 {holder}; echo rc=$?")
    assert "rc=1" in r.stdout
    assert Path(f"/proc/{holder}").exists()


def test_guard_marks_cannot_be_aimed_through_a_swapped_directory(daemon, base):
    """The guard marks a sandbox's mounts by the paths in its mountinfo, while the sandbox may run
    (restore, re-arm after a restart). A sandbox swaps a directory above a volume for a link between
    the guard reading mountinfo and marking: walked from the host through /proc/<pid>/root, the
    stale path follows that link against the host's root (here onto the host's /usr/lib), and the
    mark would land on a host mount while the volume stayed unmarked. The guard walks inside the
    sandbox's root with no link allowed and checks the mount it reached."""
    import json
    import os
    import secrets
    import subprocess

    from corral import Sandbox, Volume
    from corral.execguard import kernel
    from corral.execguard.guard import _mark_sandbox_mount, exec_mounts

    name = "guardswap-" + secrets.token_hex(4)
    Volume.create(name, size_mib=16)
    sb = Sandbox.create(template=base, volumes={"/home/user/lib": name})
    group = root_fd = -1
    try:
        r = sb.commands.run("mv /home/user /home/u2 && ln -s /usr /home/user && echo swapped")
        assert r.stdout == "swapped\n", r.stderr
        state = subprocess.run(["crun", "--root", str(daemon.run_dir / "crun"), "state", sb.id],
                               capture_output=True, text=True, check=True).stdout
        pid = json.loads(state)["pid"]
        vol = {mp: mid for mid, mp in exec_mounts(pid)}
        mnt_id = vol["/home/u2/lib"]  # the kernel followed the rename
        # What a name walked from the host reaches: the host's own /usr/lib.
        via, host = os.stat(f"/proc/{pid}/root/home/user/lib"), os.stat("/usr/lib")
        assert (via.st_dev, via.st_ino) == (host.st_dev, host.st_ino)
        group = kernel.fanotify_init()
        root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        with pytest.raises(OSError, match="openat2"):  # the stale name: a link on the way (ELOOP)
            _mark_sandbox_mount(group, root_fd, mnt_id, "/home/user/lib")
        with pytest.raises(OSError, match="leads to mount"):  # a name that reaches another mount
            _mark_sandbox_mount(group, root_fd, mnt_id, "/home/u2")
        _mark_sandbox_mount(group, root_fd, mnt_id, "/home/u2/lib")  # the volume itself: marked
    finally:
        for fd in (group, root_fd):
            if fd >= 0:
                os.close(fd)
        sb.kill()
        Volume.delete(name)
