from __future__ import annotations

from corral import Sandbox


def test_busybox_sandbox_runs_commands_without_python(daemon, busybox):
    with Sandbox.create(template=busybox) as sb:
        r = sb.commands.run("echo hi; echo oops >&2; exit 3")
        assert (r.stdout, r.stderr, r.exit_code) == ("hi\n", "oops\n", 3)
        assert sb.commands.run("command -v python3 || echo none").stdout.strip() == "none"
