"""The one exception type users see.

A `CurateError` means the run cannot go on because of something the user controls: a bad
config key, unreachable storage, impossible resources. Its message is one line that names
the key or the object and says what to do. The CLI prints it without a traceback.
Corrupt content is never a `CurateError`: it is data, recorded with its reason.

A message never carries a credential: text from a foreign library goes through `foreign`.
"""

import os
import re

# Environment variables whose values are credentials (the cloud clients' and Prefect's).
SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
)
# A credential inside a connection string, a signed URL or a header dump.
_SECRET_FIELD = re.compile(
    r"\b(AccountKey|SharedAccessSignature|SharedAccessKey|sig|Signature|access_token|"
    r"X-Amz-Security-Token|X-Amz-Credential)(=\s*)[^;&\s'\",]+"
    r"|\b(Authorization)(:\s*)[^\n]+",  # a header dump: the whole value
    re.IGNORECASE,
)


class CurateError(Exception):
    """A user-facing error with a one-line message."""


class ConfigError(CurateError):
    """A bad config key or value (the CLI exits 2 for these, 1 for other user errors)."""


def redact(text: str) -> str:
    """`text` without the values of the credential environment variables and without
    any key, signature or token field (`AccountKey=...`, `sig=...`)."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 8:  # a short value would blank out ordinary words
            text = text.replace(value, "***")
    return _SECRET_FIELD.sub(lambda m: f"{m[1] or m[3]}{m[2] or m[4]}***", text)


def foreign(exc: BaseException, limit: int = 200) -> str:
    """A foreign library's exception for a one-line message: its type and first line,
    cut to `limit` characters, credentials redacted."""
    lines = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {lines[0] if lines else ''}")[:limit]
