"""The one exception tree (corral.errors): stable codes, HTTP statuses, hints, and the wire round trip."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral import errors
from corral.errors import CorralError

ALL = errors._all_subclasses(CorralError)

# Codes are part of the wire format: clients match on them. Changing one is a breaking change, so
# this table changes only together with a note in the changelog.
STABLE = {
    "CorralError": ("CorralError", 500),
    "InvalidRequestError": ("InvalidRequest", 400),
    "InvalidPathError": ("InvalidPath", 400),
    "PolicyRejectedError": ("PolicyRejected", 400),
    "AuthenticationError": ("Unauthenticated", 401),
    "NotFoundError": ("NotFound", 404),
    "SandboxNotFoundError": ("SandboxNotFound", 404),
    "TemplateNotFoundError": ("TemplateNotFound", 404),
    "SnapshotNotFoundError": ("SnapshotNotFound", 404),
    "SecretNotFoundError": ("SecretNotFound", 404),
    "VolumeNotFoundError": ("VolumeNotFound", 404),
    "ProcessNotFoundError": ("ProcessNotFound", 404),
    "FileNotFoundInSandboxError": ("FileNotFound", 404),
    "ConflictError": ("Conflict", 409),
    "SandboxNotRunningError": ("SandboxNotRunning", 409),
    "FileConflictError": ("FileConflict", 409),
    "PayloadTooLargeError": ("PayloadTooLarge", 413),
    "CommandTimeoutError": ("CommandTimeout", 408),
    "RuntimeUnavailableError": ("RuntimeUnavailable", 503),
    "DaemonUnreachableError": ("DaemonUnreachable", 503),
    "InternalError": ("Internal", 500),
    "AgentError": ("AgentError", 502),
}


def test_every_class_in_the_module_is_in_the_tree() -> None:
    in_module = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, CorralError)}
    assert in_module == {c.__name__ for c in ALL}


def test_codes_and_statuses_are_stable() -> None:
    assert {c.__name__: (c.code, c.http_status) for c in ALL} == STABLE


def test_codes_are_unique_and_camel_case() -> None:
    codes = [c.code for c in ALL]
    assert len(codes) == len(set(codes)), sorted(codes)
    for code in codes:
        assert re.fullmatch(r"[A-Z][A-Za-z]+", code), code


def test_every_code_maps_back_to_its_class() -> None:
    assert errors.ERRORS_BY_CODE == {c.code: c for c in ALL}


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_http_status_is_an_error_status(cls: type[CorralError]) -> None:
    assert 400 <= cls.http_status <= 599


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_hint_is_non_empty_where_the_class_defines_one(cls: type[CorralError]) -> None:
    # CorralError only declares the attribute; every subclass that sets it must say something.
    if cls is not CorralError and "default_hint" in vars(cls):
        assert cls.default_hint.strip(), f"{cls.__name__} defines an empty default_hint"


@pytest.mark.parametrize("cls", [c for c in ALL if not c.__subclasses__()], ids=lambda c: c.__name__)
def test_every_leaf_error_says_what_to_do(cls: type[CorralError]) -> None:
    # Leaves are what gets raised; each one tells the caller the next step.
    assert cls.default_hint.strip()


def test_docstring_tree_matches_the_classes() -> None:
    """The tree drawn in the module docstring is the real hierarchy, with the real codes and statuses."""
    doc = errors.__doc__ or ""
    drawn: dict[str, tuple[int, str, str | None]] = {}
    stack: list[str] = []
    for line in doc.splitlines():
        m = re.search(r"(\w+Error)(?:\s+(\d{3})\s+(\w+))?", line)
        if not m or not re.match(r"^\s*(?:[│├└─ ]*)\w+Error", line):
            continue
        depth = (m.start(1) - 4) // 4
        del stack[depth:]
        parent = stack[-1] if stack else None
        stack.append(m.group(1))
        if m.group(2):
            drawn[m.group(1)] = (int(m.group(2)), m.group(3), parent)
    real = {c.__name__: (c.http_status, c.code, c.__base__.__name__) for c in ALL if c is not CorralError}
    assert drawn == real


def test_str_says_what_failed_and_what_to_do() -> None:
    e = errors.SandboxNotFoundError("no sandbox sb-0123456789ab")
    assert str(e) == f"no sandbox sb-0123456789ab ({errors.SandboxNotFoundError.default_hint})"
    assert str(errors.NotFoundError("gone")) == "gone"  # no hint, no empty parentheses


def test_constructor_defaults() -> None:
    e = errors.InvalidPathError("bad")
    assert (e.message, e.hint, e.details) == ("bad", errors.InvalidPathError.default_hint, {})
    assert errors.InvalidPathError("bad", hint="").hint == ""  # an explicit empty hint is kept
    assert isinstance(e, errors.InvalidRequestError) and isinstance(e, CorralError) and isinstance(e, Exception)


def _wire(e: CorralError) -> Any:
    return json.loads(json.dumps(e.to_body()))  # what the SDK gets is JSON, not the dict itself


def test_to_body_shape() -> None:
    e = errors.PayloadTooLargeError("too big", details={"limit": 10})
    assert e.to_body() == {"error": {"code": "PayloadTooLarge", "message": "too big",
                                     "hint": errors.PayloadTooLargeError.default_hint, "details": {"limit": 10}}}


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_round_trip_restores_class_message_hint_details(cls: type[CorralError]) -> None:
    e = cls("what failed: \u00e9 \"quoted\"", hint="do this", details={"a": 1, "b": [1, "x"], "c": {"d": None}})
    back = errors.from_body(cls.http_status, _wire(e))
    assert type(back) is cls
    assert (back.message, back.hint, back.details) == (e.message, e.hint, e.details)
    assert back.to_body() == e.to_body()


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_round_trip_with_default_hint(cls: type[CorralError]) -> None:
    back = errors.from_body(cls.http_status, _wire(cls("m")))
    assert type(back) is cls and back.hint == cls.default_hint and back.details == {}


@given(message=st.text(), hint=st.text(), details=st.dictionaries(st.text(), st.integers() | st.text() | st.none()))
def test_round_trip_any_text(message: str, hint: str, details: dict[str, Any]) -> None:
    e = errors.ConflictError(message, hint=hint, details=details)
    back = errors.from_body(409, _wire(e))
    assert type(back) is errors.ConflictError
    assert (back.message, back.hint, back.details) == (message, hint, details)


def test_unknown_code_keeps_message_and_hint() -> None:
    back = errors.from_body(418, {"error": {"code": "FromTheFuture", "message": "new failure", "hint": "upgrade"}})
    assert type(back) is errors.InvalidRequestError  # the most general class of its status
    assert (back.message, back.hint, back.details) == ("new failure", "upgrade", {})


def test_unknown_code_falls_back_to_the_class_for_its_status() -> None:
    back = errors.from_body(404, {"error": {"code": "SnapshotNotFound", "message": "no snapshot"}})
    assert isinstance(back, errors.NotFoundError)


@pytest.mark.parametrize("body", [
    None, "", "Internal Server Error", b"\x00", 42, [], ["error"], {}, {"error": None}, {"error": "text"},
    {"error": ["x"]}, {"detail": "Not Found"},  # FastAPI's own shape, e.g. for an unknown route
], ids=repr)
def test_malformed_bodies_become_internal_errors(body: Any) -> None:
    e = errors.from_body(502, body)
    assert type(e) is errors.InternalError
    assert "HTTP 502" in e.message and "unexpected body" in e.message
    assert len(e.message) < 300  # the body is quoted, but truncated


def test_missing_fields_in_error_object() -> None:
    e = errors.from_body(400, {"error": {"code": "InvalidRequest"}})
    assert type(e) is errors.InvalidRequestError
    assert e.hint == errors.InvalidRequestError.default_hint and e.details == {}


def test_wrongly_typed_fields_are_coerced() -> None:
    e = errors.from_body(400, {"error": {"code": "InvalidRequest", "message": "m", "hint": 3, "details": ["x"]}})
    assert isinstance(e.details, dict) and isinstance(e.hint, str)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3),
                           max_leaves=10)


@given(status=st.integers(100, 599), body=json_values | st.fixed_dictionaries({"error": json_values}))
def test_from_body_never_raises(status: int, body: Any) -> None:
    e = errors.from_body(status, body)
    assert isinstance(e, CorralError)
    str(e)
