"""The exceptions adistill raises on purpose. Each message names the bad value and what was expected."""


class AdistillError(Exception):
    """Base class: the CLI turns these into a one-line message and a non-zero exit code."""


class ConfigError(AdistillError, ValueError):
    """A configuration value or file is invalid."""


class DataError(AdistillError, ValueError):
    """Tenant data is missing, malformed or unusable."""


class InvalidTenantId(AdistillError, ValueError):
    """A tenant id does not match ^[a-z0-9][a-z0-9_-]{0,62}$."""


class TenantNotFound(AdistillError, KeyError):
    """No such tenant (or version) in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "tenant not found"


class CorruptArtifact(AdistillError):
    """An artifact fails its checksums, is truncated, or is not an adistill artifact."""


class BackboneMismatch(AdistillError):
    """An artifact was trained on a different backbone than the one it is loaded onto."""
