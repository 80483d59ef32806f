"""Name validators outside the policy spec: sandbox ids (api.models) and template names (runtimes.images)."""

from __future__ import annotations

import pytest

from corral import errors
from corral.api.models import check_sandbox_id
from corral.runtimes.images import validate_template_name


@pytest.mark.parametrize("sid", ["sb-0123456789ab", "sb-ffffffffffff"])
def test_good_sandbox_ids(sid: str) -> None:
    assert check_sandbox_id(sid) == sid


@pytest.mark.parametrize("sid", ["", "sb-", "sb-0123456789a", "sb-0123456789abc", "sb-0123456789AB", "SB-0123456789ab",
                                 "../sb-0123456789ab", "sb-0123456789ab/..", "x-0123456789ab", "sb-0123456789ab\x00"],
                         ids=repr)
def test_bad_sandbox_ids(sid: str) -> None:
    with pytest.raises(errors.SandboxNotFoundError, match="is not a sandbox id"):
        check_sandbox_id(sid)


@pytest.mark.parametrize("name", ["base", "busybox", "a" * 63, "x.y_z-1"])
def test_good_template_names(name: str) -> None:
    assert validate_template_name(name) == name


@pytest.mark.parametrize("name", ["", "Base", "-x", "a" * 64, "a/b", "..", "a b"], ids=repr)
def test_bad_template_names(name: str) -> None:
    with pytest.raises(errors.InvalidRequestError, match="invalid template name"):
        validate_template_name(name)


@pytest.mark.parametrize("check,value", [(check_sandbox_id, "sb-0123456789ab\n"), (validate_template_name, "base\n")],
                         ids=["sandbox-id", "template-name"])
def test_trailing_newline_is_rejected(check: object, value: str) -> None:
    with pytest.raises(errors.CorralError):
        check(value)  # type: ignore[operator]
