"""The audit log: every API call and in-sandbox decision, hash-chained and append-only."""
