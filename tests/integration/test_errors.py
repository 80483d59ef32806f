"""Bad input gets a clear 4xx with a stable code and a hint, and leaves every sandbox intact."""

from __future__ import annotations

import pytest

from corral import Sandbox, TemplateNotFoundError
from corral.errors import InvalidRequestError


@pytest.fixture(scope="module")
def victim(daemon, busybox):
    sb = Sandbox.create(template=busybox)
    sb.files.write("/root/precious", b"keep me")
    yield sb
    assert sb.files.read("/root/precious") == b"keep me"  # nothing below touched it
    sb.kill()


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("GET", "/sandboxes/sb-000000000000", {}, 404, "SandboxNotFound"),
        ("GET", "/sandboxes/not-an-id", {}, 404, "SandboxNotFound"),
        ("POST", "/sandboxes/sb-000000000000/exec", {"json": {"cmd": "true"}}, 404, "SandboxNotFound"),
        ("POST", "/sandboxes", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
         "InvalidRequest"),
        ("POST", "/sandboxes", {"json": {"template": "base", "bogus": 1}}, 400, "InvalidRequest"),
        ("POST", "/sandboxes", {"json": {"template": "../etc"}}, 400, "InvalidRequest"),
        ("POST", "/sandboxes", {"json": {"template": "nope"}}, 404, "TemplateNotFound"),
        ("POST", "/sandboxes", {"json": {"resources": {"memory_mib": 1}}}, 400, "InvalidRequest"),
        ("POST", "/sandboxes", {"json": {"env": {"A=B": "x"}}}, 400, "InvalidRequest"),
        ("POST", "/templates/nope/build", {}, 404, "TemplateNotFound"),
    ],
)
def test_bad_requests(daemon, victim, method, path, kwargs, status, code):
    with daemon.http() as h:
        r = h.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["hint"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "exactly one of cmd"),
        ({"cmd": "x", "argv": ["x"]}, "exactly one of cmd"),
        ({"argv": []}, "argv must not be empty"),
        ({"cmd": "echo \x00"}, "NUL"),
        ({"cmd": "true", "timeout_s": -1}, "timeout_s"),
        ({"cmd": "true", "cwd": "relative"}, "not absolute"),
    ],
)
def test_bad_exec_requests(daemon, victim, body, needle):
    with daemon.http() as h:
        r = h.post(f"/sandboxes/{victim.id}/exec", json=body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_sdk_raises_typed_errors(daemon, victim):
    with pytest.raises(TemplateNotFoundError) as ei:
        Sandbox.create(template="no-such-template")
    assert "corral template ls" in str(ei.value)
    with pytest.raises(InvalidRequestError):
        Sandbox.create(template="busybox", resources={"pids_max": 1})


def test_wrong_key_and_no_key(daemon):
    import httpx

    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        r = httpx.get(daemon.url + "/v1/health", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "Unauthenticated"


def test_openapi_is_served_behind_the_key_and_unknown_routes_use_the_error_format(daemon):
    import httpx

    assert httpx.get(daemon.url + "/v1/openapi.json").status_code == 401
    assert httpx.get(daemon.url + "/docs").status_code in (401, 404)
    with daemon.http() as h:
        doc = h.get("/openapi.json").json()
        assert doc["info"]["title"] == "Corral" and "/v1/sandboxes" in doc["paths"]
        r = h.get("/no-such-route")
        assert r.status_code == 404 and r.json()["error"]["code"] == "NotFound"
