"""Backups: export a sandbox or snapshot, import it elsewhere; hostile archives are refused."""

from __future__ import annotations

import io
import json
import secrets
import shutil
import tarfile
from pathlib import Path

import pytest

from corral import Sandbox, Snapshots
from corral.errors import InvalidRequestError, PayloadTooLargeError
from corral.storage import backup
from tests.conftest import fresh_daemon, traversable_tmp


def _sums(sb) -> str:
    return sb.commands.run("cd /root && find . -type f | sort | xargs sha256sum").stdout


def test_export_a_sandbox_and_import_it_into_another_corral(daemon, busybox, tmp_path):
    with Sandbox.create(template=busybox, resources={"memory_mib": 256}, env={"K": "v"},
                        metadata={"team": "x"}) as sb:
        for i in range(3):
            sb.files.write(f"/root/f{i}", secrets.token_bytes(10000))
        sb.commands.run("rm /bin/vi; chmod 4755 /root/f0; ln -s f1 /root/link")
        before = _sums(sb)
        with daemon.http() as h:
            archive = h.get(f"/sandboxes/{sb.id}/backup").content
    with fresh_daemon() as other:
        with other.http() as h:
            r = h.post("/backups", content=archive, headers={"content-type": "application/gzip"})
            assert r.status_code == 201, r.text
            res = r.json()
            new = res["sandbox"]
            assert res["kind"] == "sandbox" and (new["status"], new["reason"]) == ("stopped", "Imported")
            assert new["policy"]["resources"]["memory_mib"] == 256 and new["policy"]["env"] == {"K": "v"}
            assert new["metadata"] == {"team": "x"}
            out = h.post(f"/sandboxes/{new['id']}/exec", json={
                "cmd": "cd /root && find . -type f | sort | xargs sha256sum; test -e /bin/vi && echo vi; "
                       "stat -c %a /root/f0; readlink /root/link"}).json()
            assert out["stdout"].startswith(before)
            assert out["stdout"][len(before):].split() == ["755", "f1"]  # setuid neutralised; no vi


def test_export_and_import_a_snapshot_chain_on_the_same_daemon(daemon, busybox, tmp_path):
    with Sandbox.create(template=busybox) as sb:
        sb.files.write("/root/a", b"A")
        s1 = sb.snapshot()
    with Sandbox.create(from_snapshot=s1) as child:
        child.files.write("/root/b", b"B")
        s2 = child.snapshot()
    out = tmp_path / "s2.tar.gz"
    import subprocess
    import sys

    env = daemon.env
    r = subprocess.run([sys.executable, "-m", "corral.cli.main", "backup", "export", s2.id, str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "corral.cli.main", "backup", "import", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    top = r.stdout.strip()
    imported = Snapshots.get(top)
    assert imported.parent is not None and imported.new_bytes == 0  # content already stored: deduplicated
    with Sandbox.create(from_snapshot=top) as fork:
        assert fork.commands.run("cat /root/a /root/b").stdout == "AB"
    for s in (top, imported.parent, s2.id, s1.id):
        Snapshots.delete(s)


def _archive(entries: list[tuple[tarfile.TarInfo, bytes | None]], manifest: dict | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = json.dumps(manifest or {"format": 1, "kind": "snapshot", "template": "busybox",
                                       "layers": [{"whiteouts": [], "opaque": []}]}).encode()
        ti = tarfile.TarInfo(backup.MANIFEST)
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
        for ti, payload in entries:
            if payload is not None:
                ti.size = len(payload)
            tar.addfile(ti, io.BytesIO(payload) if payload is not None else None)
    buf.seek(0)
    return buf


def _entry(name: str, kind: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([(_entry("layers/0/../../escape"), b"x")], "escapes"),
        ([(_entry("/etc/passwd"), b"x")], "unsafe name"),
        ([(_entry("layers/0/a\\b"), b"x")], "unsafe name"),
        ([(_entry("layers/0/link", tarfile.SYMTYPE, linkname="/etc"), None),
          (_entry("layers/0/link/passwd"), b"pwned")], "non-directory"),
        ([(_entry("layers/0/hard", tarfile.LNKTYPE, linkname="/etc/shadow"), None)], "link, device or fifo"),
        ([(_entry("layers/0/mem", tarfile.CHRTYPE, devmajor=1, devminor=1), None)], "link, device or fifo"),
        ([(_entry("layers/0/fifo", tarfile.FIFOTYPE), None)], "link, device or fifo"),
        ([(_entry("layers/0/f"), b"x"), (_entry("layers/0/f"), b"y")], "twice"),
        ([(_entry("layers/0/rootowned", uid=70000), b"x")], "owner outside"),
        ([(_entry("elsewhere/f"), b"x")], "unexpected"),
        ([(_entry("layers/0/" + "/".join(["d"] * 80) + "/f"), b"x")], "deeper"),
    ],
)
def test_hostile_archives_are_refused_and_nothing_escapes(entries, match):
    tmp = traversable_tmp()
    try:
        with pytest.raises(InvalidRequestError, match=match):
            backup.import_archive(_archive(entries), tmp / "staging")
        assert not Path("/etc/pwned").exists() and not (tmp / "escape").exists()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_size_and_count_bombs_are_refused():
    tmp = traversable_tmp()
    try:
        big = [(_entry(f"layers/0/f{i}"), b"x" * 1000) for i in range(20)]
        with pytest.raises(PayloadTooLargeError, match="unpacks to more"):
            backup.import_archive(_archive(big), tmp / "a", backup.Limits(max_bytes=10_000))
        with pytest.raises(PayloadTooLargeError, match="more than 10 entries"):
            backup.import_archive(_archive(big), tmp / "b", backup.Limits(max_entries=10))
        with pytest.raises(InvalidRequestError, match="not a Corral backup"):
            backup.import_archive(_archive(big[:1], {"format": 99}), tmp / "c")
        with pytest.raises(InvalidRequestError, match="tar"):
            backup.import_archive(io.BytesIO(b"not a tar at all" * 100), tmp / "d")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_hostile_archive_through_the_api_is_a_clear_400(daemon):
    bad = _archive([(_entry("layers/0/../../x"), b"x")]).getvalue()
    with daemon.http() as h:
        r = h.post("/backups", content=bad, headers={"content-type": "application/gzip"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRequest"
    assert not any((daemon.data_dir / "tmp").iterdir())  # staging and upload cleaned up


@pytest.mark.parametrize("template", ["../../../etc", "/etc", "busybox/../base"])
def test_archive_naming_a_path_as_its_template_is_a_clear_400(daemon, template):
    # A template name from an archive is looked up under the template store: never as a path.
    bad = _archive([(_entry("layers/0/f"), b"x")], {"format": 1, "kind": "snapshot", "template": template,
                                                    "layers": [{"whiteouts": [], "opaque": []}]}).getvalue()
    with daemon.http() as h:
        r = h.post("/backups", content=bad, headers={"content-type": "application/gzip"})
    assert r.status_code == 400 and "not a template name" in r.json()["error"]["message"], r.text
    assert not any((daemon.data_dir / "tmp").iterdir())
