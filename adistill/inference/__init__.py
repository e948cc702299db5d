"""Serving without Ray: the multi-tenant engine (adapter bank, mixed-tenant forward) and the tenant cache."""
