"""Graph capture and the dependency analysis (see docs/architecture.md)."""
