"""Exec policy by content hash, enforced by the kernel (fanotify permission events)."""
