"""Daemon configuration: defaults for one machine with zero config, overridable by environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 7770


@dataclass(frozen=True)
class DaemonSettings:
    data_dir: Path = Path("/var/lib/corral")
    run_dir: Path = Path("/run/corral")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_upload_bytes: int = 1 << 30
    max_output_bytes: int = 16 << 20  # per stream of a collected (non-streaming) exec
    reconcile_interval_s: float = 2.0
    warm_pool_size: int = 1  # booted sandboxes kept ready per template used with the default policy
    log_level: str = "info"
    # networked sandboxes: the upstream resolvers (host:port; default: the host's /etc/resolv.conf),
    # extra CA certificates trusted for upstream servers (by the proxy, and in sandboxes' bundles),
    # and the pool their /30s come from
    nameservers: tuple[tuple[str, int], ...] = ()
    upstream_ca: Path | None = None
    net_pool: str = "10.200.0.0/16"
    extra: dict[str, str] = field(default_factory=dict)

    template_dir_override: Path | None = None

    @property
    def template_dir(self) -> Path:
        return self.template_dir_override or self.data_dir / "templates"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "corral.db"

    @property
    def api_key_path(self) -> Path:
        return self.data_dir / "api-key"

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "corral.sock"

    @property
    def pid_path(self) -> Path:
        return self.run_dir / "corrald.pid"

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "crun"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "corrald.log"

    @property
    def network_dir(self) -> Path:
        return self.data_dir / "network"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    def from_env(cls, **overrides: object) -> DaemonSettings:
        env = os.environ
        values: dict[str, object] = {}
        if "CORRAL_DATA_DIR" in env:
            values["data_dir"] = Path(env["CORRAL_DATA_DIR"])
        if "CORRAL_RUN_DIR" in env:
            values["run_dir"] = Path(env["CORRAL_RUN_DIR"])
        if "CORRAL_PORT" in env:
            values["port"] = int(env["CORRAL_PORT"])
        if "CORRAL_WARM_POOL" in env:
            values["warm_pool_size"] = int(env["CORRAL_WARM_POOL"])
        if "CORRAL_MAX_UPLOAD_BYTES" in env:
            values["max_upload_bytes"] = int(env["CORRAL_MAX_UPLOAD_BYTES"])
        if "CORRAL_TEMPLATE_DIR" in env:
            values["template_dir_override"] = Path(env["CORRAL_TEMPLATE_DIR"])
        if env.get("CORRAL_NAMESERVERS"):
            values["nameservers"] = tuple(_hostport(x, 53) for x in env["CORRAL_NAMESERVERS"].split(","))
        if env.get("CORRAL_UPSTREAM_CA"):
            values["upstream_ca"] = Path(env["CORRAL_UPSTREAM_CA"])
        if env.get("CORRAL_NET_POOL"):
            values["net_pool"] = env["CORRAL_NET_POOL"]
        if "CORRAL_HOST" in env:
            values["host"] = env["CORRAL_HOST"]
        for k, v in overrides.items():
            if v is not None:
                values[k] = Path(str(v)) if k in ("data_dir", "run_dir") else v
        return cls(**values)  # type: ignore[arg-type]


def _hostport(text: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if sep and host and ":" not in host and port.isdigit():
        return host, int(port)
    return text.strip("[]"), default_port
