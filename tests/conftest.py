"""Shared fixtures: a real daemon over real HTTP, real templates, and the host feature probe.

A test that needs a kernel feature asks for it with ``require("name")``: it is skipped (with the
probe's reason) only when the probe says the host lacks it, and in CI (CI=true) it fails instead,
because CI machines have every feature the development machines have.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from corral.runtimes import probe

ROOT = Path(__file__).resolve().parent.parent
# Templates are cached across test sessions (the base template takes about a minute to build).
TEMPLATE_CACHE = Path(os.environ.get("CORRAL_TEST_TEMPLATE_DIR", "/var/cache/corral-test/templates"))
_FEATURES = {f.name: f for f in probe.probe()}


def require(name: str) -> None:
    f = _FEATURES.get(name)
    if f is None:
        raise KeyError(f"unknown host feature {name!r}")
    if not f.available:
        if os.environ.get("CI"):
            pytest.fail(f"CI host lacks required feature {name}: {f.detail}")
        pytest.skip(f"host lacks {name}: {f.detail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    data_dir: Path
    run_dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        return (self.data_dir / "api-key").read_text().strip()

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CORRAL_DATA_DIR": str(self.data_dir), "CORRAL_RUN_DIR": str(self.run_dir),
                "CORRAL_PORT": str(self.port), "CORRAL_TEMPLATE_DIR": str(TEMPLATE_CACHE),
                "CORRAL_URL": self.url, "CORRAL_API_KEY": self.api_key if (self.data_dir / "api-key").exists() else ""}

    def client(self):  # type: ignore[no-untyped-def]
        from corral.sdk.client import Client

        return Client(self.url, self.api_key)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url + "/v1", headers={"Authorization": f"Bearer {self.api_key}"},
                            timeout=300)

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CORRAL_DATA_DIR": str(self.data_dir), "CORRAL_RUN_DIR": str(self.run_dir),
               "CORRAL_PORT": str(self.port), "CORRAL_TEMPLATE_DIR": str(TEMPLATE_CACHE)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "corral.cli.main", "up", "--log-level", "info"],
                                         stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()[-3000:]}")
            try:
                if (self.data_dir / "api-key").exists():
                    r = httpx.get(self.url + "/v1/health", headers={"Authorization": f"Bearer {self.api_key}"},
                                  timeout=1)
                    if r.status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("daemon did not become ready")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        """Delete every sandbox this daemon made; check nothing is left behind."""
        if self.proc is None:
            self.start()
        with self.http() as h:
            for sb in h.get("/sandboxes").json()["sandboxes"]:
                h.delete(f"/sandboxes/{sb['id']}")
        self.stop()
        crun_root = self.run_dir / "crun"
        if shutil.which("crun") and crun_root.exists():
            out = subprocess.run(["crun", "--root", str(crun_root), "list", "-q"], capture_output=True, text=True).stdout
            for cid in out.split():
                subprocess.run(["crun", "--root", str(crun_root), "delete", "-f", cid], capture_output=True)


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ while the block runs; what was there before comes back."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def fresh_daemon(**env: str) -> Iterator[Daemon]:
    """A daemon of its own (own data dir and port), for restart and cross-daemon tests; ``env`` is
    set while it starts (e.g. CORRAL_MAX_UPLOAD_BYTES). Everything it made is removed afterwards."""
    tmp = traversable_tmp()
    d = Daemon(data_dir=tmp / "data", run_dir=tmp / "run", port=free_port(), proc=None, log_path=tmp / "corrald.log")
    with environ(env):
        d.start()
    try:
        yield d
    finally:
        d.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def make_daemon(tmp: Path) -> Daemon:
    require("root")
    require("oci-runtime")
    d = Daemon(data_dir=tmp / "data", run_dir=tmp / "run", port=free_port(), proc=None, log_path=tmp / "corrald.log")
    d.start()
    return d


def traversable_tmp() -> Path:
    """A temp dir that sandbox uids can traverse (pytest's tmp_path parents are 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix="corral-test-"))
    os.chmod(tmp, 0o711)
    return tmp


@pytest.fixture
def spare_tmp() -> Iterator[Path]:
    tmp = traversable_tmp()
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    tmp = traversable_tmp()
    d = make_daemon(tmp)
    old = {k: os.environ.get(k) for k in ("CORRAL_URL", "CORRAL_API_KEY")}
    os.environ["CORRAL_URL"], os.environ["CORRAL_API_KEY"] = d.url, d.api_key
    yield d
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    d.cleanup()
    shutil.rmtree(tmp, ignore_errors=True)


def _sandbox_traces() -> tuple[set[str], set[int]]:
    cgroups = {p.name for p in Path("/sys/fs/cgroup/pids/corral").glob("sb-*")}
    agents = set()
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if b"/.corral/agent/agent.py" in (p / "cmdline").read_bytes():
                agents.add(int(p.name))
        except OSError:
            pass
    return cgroups, agents


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every sandbox the tests create is gone afterwards: no cgroup, no agent process."""
    before = _sandbox_traces()
    yield
    deadline = time.monotonic() + 10
    while True:
        cgroups, agents = _sandbox_traces()
        new = (cgroups - before[0], agents - before[1])
        if not any(new) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not any(new), f"tests left sandboxes behind: cgroups {sorted(new[0])}, agent pids {sorted(new[1])}"


def _ensure_template(d: Daemon, name: str) -> None:
    with d.http() as h:
        with h.stream("POST", f"/templates/{name}/build") as r:
            lines = [ln for ln in r.iter_lines() if ln.strip()]
    assert r.status_code == 200, lines
    assert '"done"' in lines[-1], lines[-5:]


@pytest.fixture(scope="session")
def busybox(daemon: Daemon) -> str:
    require("template-busybox")
    _ensure_template(daemon, "busybox")
    return "busybox"


@pytest.fixture(scope="session")
def base(daemon: Daemon) -> str:
    require("template-base")
    _ensure_template(daemon, "base")
    return "base"


@pytest.fixture
def sdk_sandbox(daemon: Daemon, base: str) -> Iterator[Callable[..., object]]:
    """Factory for sync SDK sandboxes that are killed after the test."""
    from corral import Sandbox

    made: list[Sandbox] = []

    def make(**kw: object) -> Sandbox:
        kw.setdefault("template", base)
        sb = Sandbox.create(**kw)  # type: ignore[arg-type]
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.kill()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        part = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if part in ("kernel", "escape", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, part))
