"""Checks that fail a run in its first second, with one line naming the key or the URL.

`preflight` imports neither torch nor Prefect (only the storage clients a URL needs), so a
typo in `input` is reported at once.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from tasks.config import CurateConfig
from tasks.discover import load_patterns, output_inside
from tasks.errors import ConfigError, CurateError
from tasks.naming import is_sample_source
from tasks.resources import check_config
from tasks.storage import Storage, open_storage
from tasks.weights import check_model_name, resolve_weights

# Environment variables a credentials secret may set: the cloud clients' own.
CREDENTIAL_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "GCS", "STORAGE_EMULATOR_HOST")


def apply_credentials(secret_name: str | None) -> None:
    """Put a Prefect Secret's credentials into this process's environment, where the
    cloud clients look for them. Values are never logged or reported."""
    if not secret_name:
        return
    from prefect.blocks.system import Secret

    try:
        values = Secret.load(secret_name, _sync=True).get()  # type: ignore[call-arg, union-attr]
    except Exception as exc:
        raise CurateError(
            f"storage.credentials_secret: cannot load Prefect Secret '{secret_name}' "
            f"({type(exc).__name__})"
        ) from None
    if not isinstance(values, dict) or not all(
        isinstance(k, str) and k.startswith(CREDENTIAL_PREFIXES) for k in values
    ):
        raise CurateError(
            f"storage.credentials_secret: Secret '{secret_name}' must be a JSON object of "
            f"cloud environment variables ({', '.join(CREDENTIAL_PREFIXES)}...)"
        )
    os.environ.update({key: str(value) for key, value in values.items()})


def check_output(output: Storage) -> None:
    """The output takes a write: a file where its folder should be, or a folder this
    process may not write to, is a config error before any work, not a traceback at the
    run's first write. (Bucket permissions are the backends' CurateErrors.)"""
    probe = f".curate-write-check-{uuid.uuid4().hex}"
    try:
        output.write(probe, b"")
        output.delete(probe)
    except OSError as exc:
        root = getattr(output, "root", None)
        if isinstance(root, Path) and root.exists() and not root.is_dir():
            raise ConfigError(f"output {output.url}: is a file, not a folder") from None
        raise ConfigError(f"output {output.url}: cannot write there ({exc.strerror})") from None


def preflight(config: CurateConfig) -> None:
    """The output is reachable with working credentials, the input holds samples, the
    named files exist, the output takes writes and lies apart from the input, the declared
    resources fit. Model and device are checked when the run first needs them."""
    apply_credentials(config.storage.credentials_secret)
    try:
        output = open_storage(config.output)
        output.probe()
    except CurateError as exc:
        raise CurateError(f"output: {exc}") from None
    try:
        source = open_storage(config.input)
        has_samples = any(is_sample_source(obj.key) for obj in source.list())
    except CurateError as exc:
        raise CurateError(f"input: {exc}") from None
    if not has_samples:
        raise CurateError(f"input {config.input}: no images or videos found")
    output_inside(source, output)
    check_output(output)
    if config.datasource.relevant_filenames_file:
        load_patterns(config.datasource.relevant_filenames_file, source, output)
    emb = config.embedding
    check_model_name(emb.model)
    if config.pretagging.model:
        check_model_name(config.pretagging.model, "pretagging.model")
    resolve_weights(emb.checkpoint, emb.pretrained, config.seed)
    check_config(config)
