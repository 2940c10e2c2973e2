"""Errors a user can cause. Each message names the bad value and says what to do."""


class CilError(Exception):
    """Base class: anything the user can fix by changing input, config or files."""


class ConfigError(CilError, ValueError):
    """A config value is unknown, out of range, or impossible in combination with another."""


class DataError(CilError, RuntimeError):
    """A dataset file is missing, corrupt or unreadable."""


class TrainingError(CilError, RuntimeError):
    """Training cannot go on (for example the loss became NaN or infinite)."""
