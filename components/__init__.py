"""KFP v2 components: one thin adapter per step over dreambooth_lib (see docs/architecture.md)."""
