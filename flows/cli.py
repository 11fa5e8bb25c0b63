"""`curate run [CONFIG.yaml] [KEY=VALUE ...]`, `curate recommend` and `curate sanity-check`.

A user error is one line on stderr and a non-zero exit (2 for the config, 1 for the rest),
never a traceback. The last line of stdout of a run is `run: <run directory>`. The config
and the storage are checked before Prefect, torch or timm are imported, so a typo costs
well under two seconds.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import textwrap
from importlib.metadata import version

# Private defaults, before Prefect reads its settings: nothing phones home (the temporary
# server's telemetry, the SDK's usage events); the console shows warnings and errors only
# (this CLI prints its own summary), the Prefect API (the UI) still gets every INFO line.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
# Without a server, a run starts a temporary one; on a busy small machine that takes longer
# than Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from tasks.errors import ConfigError, CurateError  # noqa: E402


def _run(args: list[str]) -> int:
    from flows.preflight import preflight
    from tasks.config import load_config

    config_file = None
    if args and "=" not in args[0]:
        config_file, args = args[0], args[1:]
    try:
        config = load_config(config_file, args)
        preflight(config)
    except CurateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1

    from flows.artifacts import summary_line
    from flows.curate import curate
    from flows.tempserver import prefect_api
    from tasks.storage import open_storage

    _hide_user_errors_from_console()
    try:
        with prefect_api():
            run_dir = curate(**config.sections())
    except CurateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    import json

    run_id = run_dir.rstrip("/").rsplit("/", 1)[-1]
    report = json.loads(open_storage(config.output).read_text(f"runs/{run_id}/report.json"))
    print(summary_line(report))
    print(f"report: {run_dir}/report.json")
    print(f"run: {run_dir}")
    return 0


class _UserErrorFilter(logging.Filter):
    """Drop Prefect's console records about a CurateError or a requested stop (a crash
    record per task run): the CLI says it in one line itself. The Prefect API (and UI)
    still receives the full record."""

    def filter(self, record: logging.LogRecord) -> bool:
        from tasks import stop

        if stop.requested.is_set() and record.levelno < logging.CRITICAL:
            return False
        if getattr(record, "curate_user_error", False):
            return False
        if record.exc_info and isinstance(record.exc_info[1], CurateError):
            return False
        return "CurateError" not in record.getMessage()


def _hide_user_errors_from_console() -> None:
    from prefect.logging.configuration import setup_logging

    setup_logging()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_UserErrorFilter())


def _sanity_check(pool: str | None, output: str | None, timeout: float) -> int:
    """Check the install end to end (here, or on a worker of `pool`) and print what was
    found."""
    from flows import sanity

    if pool is not None:
        if not output:
            raise ConfigError("sanity-check --pool needs --output URL: the workers' output")
        checks = sanity.on_pool(pool, output, timeout)
    else:
        checks = sanity.machine_checks()
    for what, found, _ in checks:
        print(f"{what}: {found}")
    if not all(ok for _, _, ok in checks):
        return 1
    if pool is not None:
        print(f"pool {pool}: a worker ran the checks and reached {output}")
        return 0

    from prefect import flow

    @flow(name="sanity-check")
    def ping() -> str:
        return "ok"

    print(f"prefect: flow run {ping()}")
    return 0


def _recommend(args: list[str], as_json: bool) -> int:
    """`curate recommend`: a machine, workers and batch sizes for a dataset (a location it
    lists and samples, or numbers) and the planned steps, with an estimated duration."""
    import json

    from tasks import recommend
    from tasks.storage import open_storage

    config_file = args[0] if args and "=" not in args[0] else None
    numbers, plan, config = recommend.parse_arguments(
        config_file, args[1:] if config_file else args
    )
    if numbers:
        workload = recommend.workload_from_numbers(numbers, config.every_nth_frame)
    else:
        workload = recommend.survey(open_storage(config.input), config.every_nth_frame)
    result = recommend.recommend(
        workload,
        plan,
        recommend.load_throughputs(),
        recommend.this_machine(),
        recommend.cpu_share(),
    )
    print(json.dumps(result.as_json(), indent=2) if as_json else recommend.render(result))
    return 0


def _keys_help() -> str:
    """Every config key with its default and description, from the config model."""
    from tasks.config import key_help

    lines = ["config keys (KEY=VALUE, or nested in the YAML file):"]
    for key, default, description in key_help():
        lines.append(f"  {key} [{default}]")
        lines.extend(
            textwrap.wrap(description, 88, initial_indent=" " * 6, subsequent_indent=" " * 6)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="curate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"curate {version('curate-worker')}")
    commands = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    wants_help = "run" in argv[:1] and ("-h" in argv or "--help" in argv)
    run = commands.add_parser(
        "run",
        help="one pipeline run",
        description="One pipeline run: a YAML config file (optional) and KEY=VALUE overrides "
        "by dotted key, e.g. `curate run input=./photos output=./out "
        "stopping_condition.n_samples=50`.",
        epilog=_keys_help() if wants_help else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("args", nargs="*", metavar="[CONFIG.yaml] KEY=VALUE")
    select = commands.add_parser(
        "select",
        help="selection alone on embeddings you bring",
        description="Selection alone: `curate select embeddings=FILE.npy|embeddings.csv "
        "output=DIR stopping_condition.n_samples=K [names=FILE.txt] [selection...]`.",
    )
    select.add_argument("args", nargs="*", metavar="embeddings=FILE output=DIR KEY=VALUE")
    advise = commands.add_parser(
        "recommend",
        help="a machine, workers and batch sizes for a dataset, with the run's duration",
        description="Recommend a machine (vCPUs, RAM, GPU), workers and batch sizes for a "
        "dataset, with the reasoning and an estimated duration from measured throughputs: "
        "`curate recommend input=s3://raw/cam1` (lists and samples it) or `curate recommend "
        "images=100000` / `videos=100 video_seconds=600 fps=30 [video_size=1280x720]`, plus "
        "the planned steps as `curate run` keys (enable_training=true, "
        "training.max_epochs=N, pretagging.checkpoint=FILE, embedding.model=NAME, "
        "embedding.input_size=PX, stopping_condition.n_samples=K).",
    )
    advise.add_argument("args", nargs="*", metavar="[CONFIG.yaml] KEY=VALUE")
    advise.add_argument("--json", action="store_true", help="print JSON for machines")
    check = commands.add_parser(
        "sanity-check",
        help="check the install, here or on a pool's worker",
        description="Check the install: packages, device, a tiny embedding, cloud clients, "
        "Prefect. With --pool, a worker of that pool runs the checks and reaches --output.",
    )
    check.add_argument("--pool", help="run the checks on a worker of this work pool")
    check.add_argument("--output", help="the output location the pool's workers use")
    check.add_argument("--timeout", type=float, default=300, help="seconds to wait [300]")
    parsed = parser.parse_args(argv)
    from tasks import stop

    stop.install_handlers()
    try:
        return _command(parsed)
    except KeyboardInterrupt:
        # The run has unwound: the datapool lock is released, nothing half-committed.
        print(
            "interrupted: the datapool is as the last completed run left it; the next run "
            "reuses the shards already done",
            file=sys.stderr,
        )
        return stop.exit_code()
    finally:
        # The interpreter's last garbage collection walks every object torch, timm and
        # Prefect made: seconds, for a process that is ending. Frozen objects are skipped.
        gc.freeze()


def _command(parsed: argparse.Namespace) -> int:
    if parsed.command == "select":
        from flows.select_only import main as select_main

        return select_main(parsed.args)
    if parsed.command == "run":
        return _run(parsed.args)
    if parsed.command == "recommend":
        try:
            return _recommend(parsed.args, parsed.json)
        except CurateError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, ConfigError) else 1
    try:
        return _sanity_check(parsed.pool, parsed.output, parsed.timeout)
    except CurateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
