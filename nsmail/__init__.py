"""nsmail: per-tenant network identity for virtual-domain mail."""
