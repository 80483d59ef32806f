#!/usr/bin/env python3
"""Lifecycle latencies vs a cold create, measured in the same run.

  pause -> resume -> first output    sb.pause(); sb.resume(); sb.commands.run("echo hi")
  auto-resume exec                   sb.pause(); sb.commands.run("echo hi")   (one call resumes and runs)
  stop -> start -> first output      sb.stop(); sb.start(); sb.commands.run("echo hi")
  hibernate; restore -> first output sb.pause(to_disk=True); sb.commands.run("echo hi") (CRIU via runc)
  snapshot, 100 MiB changed          sb.snapshot() of a sandbox with 100 MiB written, vs `cp -a` of the
                                     same files on the host (same disk), and a second snapshot with
                                     nothing changed
  fork from snapshot -> first output Sandbox.create(from_snapshot=snap) + echo
  cold create -> first output        Sandbox.create(template) + echo

Run as root:  .venv/bin/python bench/lifecycle.py [--runs 50] [--template base]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import stats, timeit  # noqa: E402


def _timed(fn: Callable[..., object], *args: object) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--template", default="base")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    from tests.conftest import _ensure_template, fresh_daemon

    stack = contextlib.ExitStack()
    d = stack.enter_context(fresh_daemon())
    tmp = d.data_dir.parent
    os.environ.update(CORRAL_URL=d.url, CORRAL_API_KEY=d.api_key)
    from corral import Sandbox, Snapshots

    res: dict[str, object] = {"runs": a.runs, "template": a.template}
    try:
        _ensure_template(d, a.template)
        sb = Sandbox.create(template=a.template)
        echo = lambda s=sb: s.commands.run("echo hi")  # noqa: E731
        res["pause_resume_first_output"] = stats(timeit(lambda: (sb.resume(), echo()), a.runs, setup=sb.pause))
        res["auto_resume_exec"] = stats(timeit(echo, a.runs, setup=sb.pause))
        res["stop_start_first_output"] = stats(timeit(lambda: (sb.start(), echo()), max(10, a.runs // 5),
                                                      setup=sb.stop))
        hb = Sandbox.create(template=a.template, hibernatable=True)
        hecho = lambda s=hb: s.commands.run("echo hi")  # noqa: E731
        hib: list[float] = []
        res["hibernate_restore_first_output"] = stats(timeit(hecho, max(10, a.runs // 5),
                                                             setup=lambda: hib.append(_timed(hb.pause, True))))
        res["hibernate"] = stats(hib)
        hb.kill()
        # 100 MiB of changed files (10 x 10 MiB, incompressible), then snapshot vs cp -a of the same files.
        sb.commands.run("mkdir -p /root/big && for i in 0 1 2 3 4 5 6 7 8 9; do "
                        "head -c 10485760 /dev/urandom > /root/big/f$i; done")
        t = time.perf_counter()
        snap = sb.snapshot()
        res["snapshot_100mib_ms"] = (time.perf_counter() - t) * 1000
        res["snapshot_server_ms"] = snap.timing_ms
        src = tmp / "cp-src"
        pid = json.loads(subprocess.run(["crun", "--root", str(d.run_dir / "crun"), "state", sb.id],
                                        capture_output=True, text=True, check=True).stdout)["pid"]
        shutil.copytree(f"/proc/{pid}/root/root/big", src)  # the same bytes, on the host disk
        subprocess.run(["sync"])
        cps = []
        for i in range(3):
            t = time.perf_counter()
            subprocess.run(["cp", "-a", str(src), str(tmp / f"cp-dst{i}")], check=True)
            subprocess.run(["sync", "-f", str(tmp / f"cp-dst{i}")])  # snapshots fsync their blobs too
            cps.append(time.perf_counter() - t)
        res["cp_a_100mib_ms"] = statistics.median(cps) * 1000
        res["ratio_snapshot_vs_cp"] = res["snapshot_100mib_ms"] / res["cp_a_100mib_ms"]  # type: ignore[operator]
        t = time.perf_counter()
        again = sb.snapshot()
        res["snapshot_unchanged_ms"] = (time.perf_counter() - t) * 1000
        res["snapshot_unchanged_new_bytes"] = again.new_bytes
        sb.kill()
        forks: list[Sandbox] = []
        colds: list[Sandbox] = []

        def fork() -> None:
            f = Sandbox.create(from_snapshot=snap)
            f.commands.run("echo hi")
            forks.append(f)

        def cold() -> None:
            c = Sandbox.create(template=a.template, env={"BENCH": "cold"})  # not served by the warm pool
            c.commands.run("echo hi")
            colds.append(c)

        n = max(10, a.runs // 2)
        fk, cd = [], []
        for _ in range(n):  # interleaved so both see the same machine load
            fk += timeit(fork, 1)
            cd += timeit(cold, 1)
            for s in forks + colds:
                s.kill()
            forks.clear()
            colds.clear()
        res["fork_first_output"] = stats(fk)
        res["cold_create_first_output"] = stats(cd)
        res["ratio_fork_vs_cold"] = res["fork_first_output"]["p50_ms"] / res["cold_create_first_output"]["p50_ms"]  # type: ignore[index]
        Snapshots.delete(again)
        Snapshots.delete(snap)
    finally:
        stack.close()
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"{k:32s} " + "  ".join(f"{kk}={vv:.2f}" if isinstance(vv, float) else f"{kk}={vv}"
                                          for kk, vv in v.items()))
        elif isinstance(v, float):
            print(f"{k:32s} {v:.2f}")
        else:
            print(f"{k:32s} {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
