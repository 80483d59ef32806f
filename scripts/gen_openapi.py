#!/usr/bin/env python3
"""Write the daemon's OpenAPI document to docs/openapi.json, or check that it is up to date.

    python scripts/gen_openapi.py          # regenerate docs/openapi.json
    python scripts/gen_openapi.py --check  # exit 1, with a summary of the differences, if it is stale

The document comes from the app itself (``corral.daemon.app.create_app().openapi()``), so it is
exactly what a running daemon serves at /openapi.json; the file is checked in so that API changes
show up in review. tests/unit/test_openapi.py fails when the two drift apart.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "openapi.json"


def document() -> dict[str, Any]:
    from corral.daemon.app import create_app

    doc: dict[str, Any] = create_app().openapi()
    return doc


def render(doc: dict[str, Any] | None = None) -> str:
    return json.dumps(document() if doc is None else doc, indent=2, sort_keys=True) + "\n"


def _operations(doc: dict[str, Any]) -> dict[str, str]:
    return {f"{method.upper()} {path}": op.get("operationId", "")
            for path, ops in doc.get("paths", {}).items() for method, op in ops.items()}


def summary(old_text: str, new_text: str, max_lines: int = 60) -> str:
    """What changed: operations added or removed, schemas added or removed, then the start of the diff."""
    out: list[str] = []
    try:
        old = json.loads(old_text) if old_text else {}
    except ValueError:
        old = {}
        out.append(f"  {OUTPUT.relative_to(ROOT)} is not valid JSON")
    new = json.loads(new_text)
    old_ops, new_ops = _operations(old), _operations(new)
    for op in sorted(new_ops.keys() - old_ops.keys()):
        out.append(f"  + operation {op}")
    for op in sorted(old_ops.keys() - new_ops.keys()):
        out.append(f"  - operation {op}")
    old_schemas = set(old.get("components", {}).get("schemas", {}))
    new_schemas = set(new.get("components", {}).get("schemas", {}))
    for s in sorted(new_schemas - old_schemas):
        out.append(f"  + schema {s}")
    for s in sorted(old_schemas - new_schemas):
        out.append(f"  - schema {s}")
    diff = list(difflib.unified_diff(old_text.splitlines(), new_text.splitlines(),
                                     f"{OUTPUT.relative_to(ROOT)} (checked in)", "generated from the app",
                                     lineterm="", n=2))
    changed = sum(1 for ln in diff if ln[:1] in "+-" and ln[:3] not in ("+++", "---"))
    out.append(f"  {changed} changed lines in the JSON")
    out.extend(diff[:max_lines])
    if len(diff) > max_lines:
        out.append(f"  ... {len(diff) - max_lines} more diff lines")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if docs/openapi.json is stale")
    args = ap.parse_args(argv)
    new_text = render()
    if args.check:
        old_text = OUTPUT.read_text() if OUTPUT.exists() else ""
        if old_text == new_text:
            print(f"{OUTPUT.relative_to(ROOT)} is up to date")
            return 0
        state = "differs from the daemon's API" if OUTPUT.exists() else "does not exist"
        print(f"{OUTPUT.relative_to(ROOT)} {state}; run `python scripts/gen_openapi.py`:")
        print(summary(old_text, new_text))
        return 1
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(new_text)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(_operations(json.loads(new_text)))} operations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
