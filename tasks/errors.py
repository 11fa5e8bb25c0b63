"""The one exception type users see.

A `CurateError` means the run cannot go on because of something the user controls: a bad
config key, unreachable storage, impossible resources. Its message is one line that names
the key or the object and says what to do. The CLI prints it without a traceback.
Corrupt content is never a `CurateError`: it is data, recorded with its reason.
"""


class CurateError(Exception):
    """A user-facing error with a one-line message."""


class ConfigError(CurateError):
    """A bad config key or value (the CLI exits 2 for these, 1 for other user errors)."""
