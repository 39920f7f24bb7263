"""Internals shared by every op family: one home per concept (see docs/architecture.md)."""
