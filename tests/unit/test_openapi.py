"""The OpenAPI document: docs/openapi.json is what the daemon serves, and the API is described fully."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute

from corral import errors
from corral.api import models as m
from corral.daemon import app as app_mod
from corral.daemon.app import create_app

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_openapi.py"
REGENERATE = "run `python scripts/gen_openapi.py` and commit docs/openapi.json"

# Error statuses every /v1 operation declares, each with the ErrorBody schema.
DECLARED_ERRORS = {"400", "401", "404", "408", "409", "413", "503"}


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_openapi", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_openapi", mod)
    spec.loader.exec_module(mod)
    return mod


gen = _load_script()


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    d: dict[str, Any] = gen.document()
    return d


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, ops in doc["paths"].items() for method, op in ops.items()]


def test_checked_in_document_matches_the_app() -> None:
    assert gen.OUTPUT == ROOT / "docs" / "openapi.json"
    assert gen.OUTPUT.exists(), f"docs/openapi.json is missing: {REGENERATE}"
    old, new = gen.OUTPUT.read_text(), gen.render()
    assert old == new, f"docs/openapi.json is out of date: {REGENERATE}\n{gen.summary(old, new)}"


def test_document_is_deterministic(doc: dict[str, Any]) -> None:
    assert gen.render() == gen.render(create_app().openapi())
    assert gen.render().endswith("}\n")


def test_check_mode_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str], doc: dict[str, Any]) -> None:
    out = tmp_path / "openapi.json"
    monkeypatch.setattr(gen, "OUTPUT", out)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 1
    assert "does not exist" in capsys.readouterr().out
    assert gen.main([]) == 0 and out.read_text() == gen.render()
    assert gen.main(["--check"]) == 0
    stale = json.loads(out.read_text())
    del stale["paths"]["/v1/health"]
    stale["components"]["schemas"]["Gone"] = {"type": "object"}
    out.write_text(json.dumps(stale, indent=2, sort_keys=True) + "\n")
    assert gen.main(["--check"]) == 1
    text = capsys.readouterr().out
    assert "python scripts/gen_openapi.py" in text
    assert "+ operation GET /v1/health" in text and "- schema Gone" in text


def test_every_operation_has_a_stable_unique_name(doc: dict[str, Any]) -> None:
    # The app's routers (FastAPI includes them lazily, so app.routes does not list their routes).
    routers = [v for v in vars(app_mod).values() if isinstance(v, APIRouter)]
    routes = {(method.lower(), r.path): r for router in routers for r in router.routes if isinstance(r, APIRoute)
              for method in r.methods}
    ids = []
    for method, path, op in operations(doc):
        route = routes[(method, path)]
        # Route names are explicit noun.verb names (the audit log records them as the action) ...
        assert re.fullmatch(r"[a-z]+(\.[a-z_]+)?", route.name), (method, path, route.name)
        # ... and the operationId is that name, not the Python function's name or the path.
        assert op["operationId"] == route.name, (route.name, op["operationId"])
        assert op.get("summary"), (method, path)
        ids.append(op["operationId"])
    assert len(ids) == len(set(ids))
    documented = {k: r for k, r in routes.items() if r.include_in_schema}
    assert len(documented) == len(ids), "an HTTP route is missing from the document"
    names = [getattr(r, "name", "") for router in routers for r in router.routes]
    assert len(names) == len(set(names)), "two routes share a name (the audit log could not tell them apart)"


def test_every_v1_route_declares_the_error_responses(doc: dict[str, Any]) -> None:
    ops = operations(doc)
    assert ops and all(path.startswith(m.API_PREFIX + "/") for _, path, _ in ops)
    for method, path, op in ops:
        responses = op["responses"]
        missing = DECLARED_ERRORS - set(responses)
        assert not missing, f"{method.upper()} {path} does not declare {sorted(missing)}"
        for status in DECLARED_ERRORS:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)


def test_error_body_schema_matches_the_error_tree(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert set(schemas["ErrorDetail"]["properties"]) == set(errors.InvalidRequestError("x").to_body()["error"])
    m.ErrorBody.model_validate(errors.SandboxNotFoundError("x", details={"a": 1}).to_body())


def test_no_operation_advertises_a_status_the_app_never_sends(doc: dict[str, Any]) -> None:
    assert not [(method, path) for method, path, op in operations(doc) if "422" in op["responses"]]


def test_every_status_of_the_error_tree_is_declared(doc: dict[str, Any]) -> None:
    daemon_statuses = {str(c.http_status) for c in errors._all_subclasses(errors.CorralError)
                       if c is not errors.DaemonUnreachableError}
    for method, path, op in operations(doc):
        assert daemon_statuses <= set(op["responses"]), (method, path)


def test_security_note_is_in_the_description(doc: dict[str, Any]) -> None:
    assert "Authorization: Bearer <key>" in doc["info"]["description"]
    assert doc["info"]["title"] == "Corral"
