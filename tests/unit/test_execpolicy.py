"""Exec policy: validation, compilation against a template index, the decision order; the ELF and
index helpers of the guard on real files."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from corral.errors import PolicyRejectedError
from corral.execguard import elf, index
from corral.policy.execpolicy import ExecIndex, ExecPolicy, compile_exec, decide
from corral.policy.spec import SandboxPolicy

A, B, LD = "a" * 64, "b" * 64, "c" * 64
IDX = ExecIndex(files={"/usr/bin/npx": A, "/usr/bin/true": B, "/lib64/ld-linux-x86-64.so.2": LD},
                names={"npx": (A,), "true": (B,), "ld-linux-x86-64.so.2": (LD,)}, loaders=frozenset({LD}))


def test_default_is_off_and_poolable():
    assert SandboxPolicy().exec_policy == ExecPolicy() and ExecPolicy().mode == "off"


@pytest.mark.parametrize("entry", ["/usr/bin/npx", "../npx", "sha256:xyz", "sha256:" + "a" * 63, "", "a b", "..",
                                   "npx\x00.allowed"])
def test_bad_entries_are_rejected(entry):
    with pytest.raises(ValidationError):
        ExecPolicy(mode="enforce", deny=[entry])


def test_entries_are_normalised_and_template_only_in_allow():
    p = ExecPolicy(mode="enforce", deny=["npx", "SHA256:" + "A" * 64, "npx"])
    assert p.deny == ["npx", "sha256:" + "a" * 64]
    with pytest.raises(ValidationError, match="only meaningful in allow"):
        ExecPolicy(mode="enforce", deny=["template"])
    with pytest.raises(ValidationError, match="mode is 'off'"):
        ExecPolicy(deny=["npx"])


def test_compile_resolves_names_and_refuses_unknown_ones():
    plan = compile_exec(ExecPolicy(mode="enforce", deny=["npx", f"sha256:{B}"]), IDX, template="base")
    assert plan.deny == {A: "deny:npx", B: f"deny:sha256:{B}"} and plan.allow is None
    with pytest.raises(PolicyRejectedError, match="no executable of that name is in template 'base'"):
        compile_exec(ExecPolicy(mode="enforce", deny=["curl"]), IDX, template="base")


def test_allowlists():
    plan = compile_exec(ExecPolicy(mode="enforce", allow=["template"]), IDX)
    assert plan.allow == {A, B, LD}
    plan = compile_exec(ExecPolicy(mode="enforce", allow=["true"]), IDX)
    assert plan.allow == {B, LD}  # the loader comes with any dynamic binary
    with pytest.raises(PolicyRejectedError, match="needs a template"):
        compile_exec(ExecPolicy(mode="enforce", allow=["template"]), ExecIndex(complete=False))


def test_decision_order():
    deny = compile_exec(ExecPolicy(mode="enforce", deny=["npx"]), IDX)
    assert decide(deny, A, False) == decide(deny, A, False, False)
    assert not decide(deny, A, False).allowed and decide(deny, A, False).rule == "deny:npx"
    assert decide(deny, "f" * 64, False).allowed  # denylist: unknown content runs
    assert decide(deny, LD, as_program_loader=False).allowed  # as an interpreter
    assert decide(deny, LD, as_program_loader=True).rule == "loader"
    assert decide(deny, B, False, corral_runtime=True).rule == "corral-runtime"
    allow = compile_exec(ExecPolicy(mode="enforce", allow=["template"], deny=["true"]), IDX)
    assert decide(allow, B, False).rule == "deny:true"  # deny wins
    assert decide(allow, "f" * 64, False).rule == "allowlist"
    assert decide(allow, A, False).allowed


def test_elf_interp_and_hash_of_real_files(tmp_path):
    true = Path(shutil.which("true") or "/bin/true").resolve()
    fd = os.open(true, os.O_RDONLY)
    try:
        facts = elf.facts(fd, os.fstat(fd).st_size, 1 << 30)
        assert facts.interp == "/lib64/ld-linux-x86-64.so.2" and not facts.shebang
        assert facts.sha256 == hashlib.sha256(true.read_bytes()).hexdigest()
        with pytest.raises(elf.TooLargeError):
            elf.facts(fd, os.fstat(fd).st_size, 100)
    finally:
        os.close(fd)
    script = tmp_path / "s"
    script.write_text("#!/bin/sh\necho\n")
    fd = os.open(script, os.O_RDONLY)
    try:
        f = elf.facts(fd, 15, 1000)
        assert f.shebang and f.interp is None
    finally:
        os.close(fd)
    assert elf.is_loader_name("/x/ld-linux-x86-64.so.2") and elf.is_loader_name("ld-musl-x86_64.so.1")
    assert not elf.is_loader_name("/usr/bin/ldd") and not elf.is_loader_name("ld-helper")


def test_index_of_a_small_root(tmp_path):
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    shutil.copy(Path(shutil.which("true") or "/bin/true").resolve(), root / "usr/bin/true")
    (root / "usr/bin/data.txt").write_text("not executable")
    (root / "lib64/ld-linux-x86-64.so.2").write_bytes(b"\x7fELF fake loader")
    os.symlink("/usr/bin/true", root / "usr/bin/alias")  # absolute: resolved inside the root
    os.symlink("/etc/passwd", root / "usr/bin/escape")  # points outside: nothing of the host is read
    idx = index.build(root)
    sha_true = hashlib.sha256((root / "usr/bin/true").read_bytes()).hexdigest()
    assert idx.files["/usr/bin/true"] == sha_true and "/usr/bin/data.txt" not in idx.files
    assert idx.names["alias"] == (sha_true,) and "escape" not in idx.names
    assert idx.loaders == {hashlib.sha256(b"\x7fELF fake loader").hexdigest()}
    cached = index.load_or_build(tmp_path, root, 123.0)
    assert cached == index.load_or_build(tmp_path, root, 123.0) and cached.files == idx.files
