"""The one exception family pkdpipe raises for problems a user can fix.

The CLI prints any `PkdError` as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class PkdError(Exception):
    """Base of every user-facing error: bad input, missing files, mismatched models or caches."""


class ConfigError(PkdError):
    """A flag or config value that cannot work (bad layer map, unknown strategy, ...)."""


class DataError(PkdError):
    """A dataset that cannot be read as the task says: missing file, field, label or text."""


class ModelError(PkdError):
    """A teacher or student that cannot be loaded or does not fit the task or cache."""


class CacheError(PkdError):
    """A cache that is missing, incomplete, corrupted, or does not fit what reads it."""


class CacheNotFound(CacheError):
    """No local cache has this path or key (a store may still have it)."""


class StoreError(PkdError):
    """A shared cache store that cannot be reached, read or written."""


class DiskFullError(PkdError):
    """A write that ran out of disk space (or hit a file-size limit): say what to free, keep what is done."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a run that knows what it leaves behind: the message says what was kept (a
    checkpoint and its step, or nothing yet), so the CLI never promises a resume that cannot happen.
    A KeyboardInterrupt still, so every cleanup on the way out runs as for a plain one."""
