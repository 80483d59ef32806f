"""Sandbox networking on the host: netns wiring and nftables (netns), the per-sandbox DNS responder
(dns), the egress proxy and credential broker (proxy), encrypted secrets and the installation CA
(secrets), tied together for the daemon by :class:`corral.network.manager.NetworkManager`.

The policy itself (what is allowed) is pure and lives in :mod:`corral.policy.network`.
"""
