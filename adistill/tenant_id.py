"""Tenant ids are validated before any path is built from them."""

import re

from adistill.errors import InvalidTenantId

TENANT_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def validate_tenant_id(tenant_id: object) -> str:
    """Return `tenant_id` if it is a valid id, else raise `InvalidTenantId` naming it."""
    if not isinstance(tenant_id, str) or not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise InvalidTenantId(
            f"invalid tenant id {tenant_id!r}: expected 1-63 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return tenant_id
