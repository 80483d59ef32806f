#!/usr/bin/env python3
"""Start-up and exec latency of Corral vs bare crun and a bare fork+exec, measured in the same run.

  create -> first output : Sandbox.create(template) + commands.run("echo hi") through the SDK, over HTTP,
                           cold (booted now) and from the warm pool (a sandbox booted ahead and claimed)
  baseline               : `crun run` of the same rootfs with the same OCI config running `true`
                           (a) on an already mounted rootfs, (b) with a fresh overlay like Corral makes
  exec round trip        : sb.commands.run("true") in a running sandbox, through the SDK
  baseline               : posix_spawn + waitpid of /bin/true on the host

Run as root:  .venv/bin/python bench/startup.py [--runs 100] [--template base] [--concurrent 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import stats, timeit  # noqa: E402

from corral.policy.compile import SandboxPaths, compile_oci  # noqa: E402
from corral.policy.spec import SandboxPolicy  # noqa: E402
from corral.runtimes import oci  # noqa: E402


def fork_exec_true() -> None:
    pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
    os.waitpid(pid, 0)


class CrunBaseline:
    """The same rootfs and OCI config Corral uses, run directly by crun with `true` as the process."""

    def __init__(self, template_rootfs: str, agent_runtime: Path, work: Path):
        self.template_rootfs = template_rootfs
        self.work = work
        self.binary = oci.find_oci_runtime() or "crun"
        self.state = work / "state"
        self.n = 0
        self.agent_runtime = agent_runtime

    def _bundle(self, rootfs: str, name: str) -> Path:
        paths = SandboxPaths(rootfs=rootfs, agent_src=str(next((self.agent_runtime.parent.parent / "agent").glob("[0-9a-f]*"))),
                             agent_runtime=str(self.agent_runtime), workspace=None)
        nofile = min(65536, __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[1])
        cfg = compile_oci(name, SandboxPolicy(template="x"), paths, nofile=nofile).config
        cfg["process"]["args"] = ["/bin/true"]
        b = self.work / f"bundle-{name}"
        b.mkdir(parents=True, exist_ok=True)
        (b / "config.json").write_text(json.dumps(cfg))
        return b

    def run_prepared(self) -> None:
        if not hasattr(self, "_prepared"):
            d = self.work / "prepared"
            for sub in ("upper", "work", "rootfs"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            os.chown(d / "upper", 100000, 100000)
            oci._mount("overlay", str(d / "rootfs"), "overlay", 0,
                       f"lowerdir={self.template_rootfs},upperdir={d / 'upper'},workdir={d / 'work'}")
            self._prepared = self._bundle(str(d / "rootfs"), "bench-prepared")
        self.n += 1
        subprocess.run([self.binary, "--root", str(self.state), "run", "-b", str(self._prepared), f"bench-p{self.n}"],
                       check=True, stdout=subprocess.DEVNULL)

    def run_fresh_overlay(self) -> None:
        self.n += 1
        d = self.work / f"fresh-{self.n}"
        for sub in ("upper", "work", "rootfs"):
            (d / sub).mkdir(parents=True)
        os.chown(d / "upper", 100000, 100000)
        oci._mount("overlay", str(d / "rootfs"), "overlay", 0,
                   f"lowerdir={self.template_rootfs},upperdir={d / 'upper'},workdir={d / 'work'}")
        b = self._bundle(str(d / "rootfs"), f"bench-f{self.n}")
        subprocess.run([self.binary, "--root", str(self.state), "run", "-b", str(b), f"bench-f{self.n}"],
                       check=True, stdout=subprocess.DEVNULL)
        oci._umount(str(d / "rootfs"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--template", default="base")
    ap.add_argument("--concurrent", type=int, default=0, help="also run N sandboxes at once, each answering exec")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    oci.enter_private_mount_namespace()  # for the crun baseline, before any thread
    from tests.conftest import TEMPLATE_CACHE, _ensure_template, fresh_daemon

    stack = contextlib.ExitStack()
    d = stack.enter_context(fresh_daemon())
    tmp = d.data_dir.parent
    os.environ.update(CORRAL_URL=d.url, CORRAL_API_KEY=d.api_key)
    from corral import Sandbox

    results: dict[str, object] = {"runs": a.runs, "template": a.template}
    try:
        _ensure_template(d, a.template)
        rootfs = str(TEMPLATE_CACHE / a.template / "rootfs")
        agent_rt = next((d.data_dir / "agent-runtime").iterdir())
        base = CrunBaseline(rootfs, agent_rt, tmp / "crun")
        print(f"[bench] {a.runs} runs each, template {a.template}", flush=True)

        fe = timeit(fork_exec_true, a.runs * 5, warmup=3)
        crun_p = timeit(base.run_prepared, a.runs, warmup=3)
        crun_f = timeit(base.run_fresh_overlay, a.runs, warmup=3)

        sandboxes: list[Sandbox] = []

        def create_first_output() -> None:
            sb = Sandbox.create(template=a.template)
            assert sb.commands.run("echo hi").stdout == "hi\n"
            sandboxes.append(sb)

        # Cold: a policy the warm pool cannot serve (an env var), so every create boots a sandbox.
        def cold_first_output() -> None:
            sb = Sandbox.create(template=a.template, env={"BENCH": "cold"})
            assert sb.commands.run("echo hi").stdout == "hi\n"
            sandboxes.append(sb)

        def pool_ready() -> None:  # untimed: wait until the warm pool has refilled
            with d.http() as h:
                for _ in range(500):
                    if h.get("/health").json()["warm_pool"].get(a.template, 0) >= 1:
                        return
                    time.sleep(0.01)

        create = timeit(cold_first_output, a.runs, warmup=2)
        for sb in sandboxes:
            sb.kill()
        sandboxes.clear()
        warm = timeit(create_first_output, a.runs, warmup=1, setup=pool_ready)
        for sb in sandboxes:
            sb.kill()
        with Sandbox.create(template=a.template) as sb:
            ex = timeit(lambda: sb.commands.run("true"), a.runs * 3, warmup=10)
            ex_argv = timeit(lambda: sb.commands.run(["/bin/true"]), a.runs * 3, warmup=10)
        results.update(
            fork_exec_true=stats(fe), crun_run_true_prepared=stats(crun_p), crun_run_true_fresh_overlay=stats(crun_f),
            create_to_first_output=stats(create), create_to_first_output_warm_pool=stats(warm),
            exec_roundtrip_shell=stats(ex), exec_roundtrip_argv=stats(ex_argv),
        )
        r = results
        results["ratio_create_vs_crun_fresh_overlay"] = r["create_to_first_output"]["p50_ms"] / r["crun_run_true_fresh_overlay"]["p50_ms"]  # type: ignore[index]
        results["ratio_create_vs_crun_prepared"] = r["create_to_first_output"]["p50_ms"] / r["crun_run_true_prepared"]["p50_ms"]  # type: ignore[index]
        results["ratio_warm_create_vs_crun_fresh_overlay"] = r["create_to_first_output_warm_pool"]["p50_ms"] / r["crun_run_true_fresh_overlay"]["p50_ms"]  # type: ignore[index]
        results["ratio_exec_argv_vs_fork_exec"] = r["exec_roundtrip_argv"]["p50_ms"] / r["fork_exec_true"]["p50_ms"]  # type: ignore[index]
        results["ratio_exec_shell_vs_fork_exec"] = r["exec_roundtrip_shell"]["p50_ms"] / r["fork_exec_true"]["p50_ms"]  # type: ignore[index]

        if a.concurrent:
            t0 = time.perf_counter()
            many = [Sandbox.create(template="busybox" if a.template != "busybox" and _ensure_template(d, "busybox") is None
                                   else a.template) for _ in range(a.concurrent)]
            t_create = time.perf_counter() - t0
            lat = []
            for sb in many:
                t = time.perf_counter()
                assert sb.commands.run(f"echo {sb.id}").stdout == f"{sb.id}\n"
                lat.append(time.perf_counter() - t)
            mem = int(subprocess.run(["free", "-m"], capture_output=True, text=True).stdout.split()[8])
            running = sum(1 for s in Sandbox.list() if s.status == "running")
            for sb in many:
                sb.kill()
            results["concurrent"] = {"sandboxes": a.concurrent, "running_at_once": running,
                                     "create_all_s": t_create, "exec_each": stats(lat), "host_used_mib": mem}
    finally:
        subprocess.run(["umount", "-R", str(tmp / "crun" / "prepared" / "rootfs")], capture_output=True)
        stack.close()
    for k, v in results.items():
        if isinstance(v, dict):
            print(f"{k:34s} " + "  ".join(f"{kk}={vv:.2f}" if isinstance(vv, float) else f"{kk}={vv}"
                                          for kk, vv in v.items()))
        elif isinstance(v, float):
            print(f"{k:34s} {v:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    tempfile.tempdir = None
    sys.exit(main())
