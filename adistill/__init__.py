"""adistill: multi-tenant intent retrieval on one frozen encoder, with AdapterDistillation."""

__version__ = "0.1.0"
