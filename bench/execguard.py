#!/usr/bin/env python3
"""Exec guard overhead: the same work with the guard in enforce mode vs off, in the same run.

  exec loop   bash runs /bin/true 2,000 times in a sandbox of the base template (warm hash cache:
              one untimed round first); enforce mode denies curl by hash, so every exec is checked
  C build     `make -j2` of a small generated C project (40 files) in a root="host" sandbox (the
              host's gcc; skipped when the host has no gcc/make), enforce mode with a deny rule

Runs alternate (off, enforce, off, ...) so drifting load on a shared machine hits both alike; the
ratio of medians is the overhead. Every decision of the guarded runs also goes to the audit log.

Run as root:  .venv/bin/python bench/execguard.py [--runs 7] [--execs 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

DENY = {"mode": "enforce", "deny": ["sha256:" + "0" * 64]}


def project(n: int) -> dict[str, str]:
    files = {}
    for i in range(n):
        body = "\n".join(f"int f{i}_{j}(int x) {{ int s = 0; for (int k = 0; k < x; k++) s += k * {j} ^ {i}; "
                         f"return s; }}" for j in range(30))
        files[f"u{i}.c"] = f"#include <stdio.h>\n#include <string.h>\n{body}\n"
    files["main.c"] = "int main(void) { return 0; }\n"
    objs = " ".join(f"u{i}.o" for i in range(n)) + " main.o"
    files["Makefile"] = f"CFLAGS=-O1\nall: prog\nprog: {objs}\n\t$(CC) -o $@ $^\nclean:\n\trm -f *.o prog\n"
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--execs", type=int, default=2000)
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    from tests.conftest import _ensure_template, fresh_daemon

    stack = contextlib.ExitStack()
    d = stack.enter_context(fresh_daemon())
    os.environ.update(CORRAL_URL=d.url, CORRAL_API_KEY=d.api_key)
    from corral import Sandbox

    res: dict[str, object] = {"runs": a.runs, "execs": a.execs}
    try:
        _ensure_template(d, "base")
        loop = f"for i in $(seq {a.execs}); do /bin/true; done"
        sbs = {"off": Sandbox.create(template="base", env={"BENCH": "off"}),
               "enforce": Sandbox.create(template="base", exec_policy={"mode": "enforce", "deny": ["curl"]})}
        times: dict[str, list[float]] = {"off": [], "enforce": []}
        for sb in sbs.values():
            sb.commands.run(loop)  # warm: page cache, hash cache
        for _ in range(a.runs):
            for mode, sb in sbs.items():
                t = time.perf_counter()
                r = sb.commands.run(loop, timeout_s=600)
                times[mode].append(time.perf_counter() - t)
                assert r.exit_code == 0, r
        p50 = {k: statistics.median(v) for k, v in times.items()}
        res["exec_loop"] = {k: {"p50_s": round(v, 3), "per_exec_us": round(v / a.execs * 1e6, 1)} for k, v in p50.items()}
        res["exec_loop_overhead"] = round(p50["enforce"] / p50["off"] - 1, 4)
        decisions = sbs["enforce"].audit.list(kind="exec.decision", limit=10000)
        res["audit_records_last_batch"] = len(decisions)
        for sb in sbs.values():
            sb.kill()

        if shutil.which("gcc") and shutil.which("make"):
            builds = {"off": Sandbox.create(root="host", allow_weaker_isolation=True, env={"BENCH": "off"}),
                      "enforce": Sandbox.create(root="host", allow_weaker_isolation=True, exec_policy=DENY)}
            for sb in builds.values():
                for name, text in project(40).items():
                    sb.files.write(f"/workspace/p/{name}", text)
                sb.commands.run("make -C /workspace/p -j2 >/dev/null")  # warm
            bt: dict[str, list[float]] = {"off": [], "enforce": []}
            for _ in range(max(3, a.runs // 2)):
                for mode, sb in builds.items():
                    sb.commands.run("make -C /workspace/p clean >/dev/null")
                    t = time.perf_counter()
                    r = sb.commands.run("make -C /workspace/p -j2 >/dev/null", timeout_s=600)
                    bt[mode].append(time.perf_counter() - t)
                    assert r.exit_code == 0, r
            bp = {k: statistics.median(v) for k, v in bt.items()}
            res["c_build"] = {k: {"p50_s": round(v, 3)} for k, v in bp.items()}
            res["c_build_overhead"] = round(bp["enforce"] / bp["off"] - 1, 4)
            for sb in builds.values():
                sb.kill()
        else:
            res["c_build"] = "skipped: the host has no gcc/make"
    finally:
        stack.close()
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
