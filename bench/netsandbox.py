#!/usr/bin/env python3
"""What a network policy costs a sandbox's lifecycle: create and delete of a networked sandbox
(`network={"allow": [...]}`: address reserved, CA bundle and resolv.conf written, veth + nftables
wired after boot) vs the same sandbox without a network, in the same run.

Runs alternate (plain, networked, plain, ...) with the warm pool off (CORRAL_WARM_POOL=0), so both
boot for real; the ratio of medians is the cost. Request latency through the proxy is measured at
the component level by bench/egress.py.

Run as root:  .venv/bin/python bench/netsandbox.py [--runs 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    from tests.conftest import _ensure_template, fresh_daemon

    with contextlib.ExitStack() as stack:
        d = stack.enter_context(fresh_daemon(CORRAL_WARM_POOL="0", CORRAL_NET_POOL="10.207.0.0/24"))
        from corral import Client, Sandbox
        from corral.sdk.sync import run

        _ensure_template(d, "base")
        client = Client(d.url, d.api_key)
        kinds = {"plain": {}, "networked": {"network": {"allow": ["pypi.org", "*.github.com"]}}}
        create: dict[str, list[float]] = {k: [] for k in kinds}
        delete: dict[str, list[float]] = {k: [] for k in kinds}
        for kw in kinds.values():  # warm: page cache, template, first wiring
            Sandbox.create("base", client=client, **kw).kill()
        for _ in range(a.runs):
            for kind, kw in kinds.items():
                t = time.perf_counter()
                sb = Sandbox.create("base", client=client, **kw)
                create[kind].append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                sb.kill()
                delete[kind].append((time.perf_counter() - t) * 1000)
        run(client.close())
    res: dict[str, object] = {"runs": a.runs}
    for name, table in (("create", create), ("delete", delete)):
        med = {k: statistics.median(v) for k, v in table.items()}
        res[name] = {"median_ms": {k: round(v, 1) for k, v in med.items()},
                     "ratio": round(med["networked"] / med["plain"], 2)}
        print(f"{name:7s} plain {med['plain']:7.1f} ms   networked {med['networked']:7.1f} ms   "
              f"ratio {med['networked'] / med['plain']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
