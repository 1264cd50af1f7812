"""`roundhouse`: the command line. The one place that composes the services."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from services.cli.stats import add_stats_command

# The CLI starts service processes itself; gRPC's fork handlers only add noise there.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# Tokenizers' own thread pool competes with torch for the same cores; batching does better.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _run_service(name: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        module = __import__(f"services.{name}.server", fromlist=["main"])
        module.main()
        return 0

    return run


def _up(args: argparse.Namespace) -> int:
    from services.cli.stack import up

    return up(catalog=args.catalog)


def _db_upgrade(args: argparse.Namespace) -> int:
    from services.common.db.migrate import upgrade
    from services.common.settings import CommonSettings

    upgrade(CommonSettings().resolved_database_url(), args.revision)
    print(f"database migrated to {args.revision}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from services.cli.assets import apply_files

    return apply_files(Path(args.file), dry_run=args.dry_run)


def _models_ls(args: argparse.Namespace) -> int:
    from services.cli.assets import list_models

    return list_models()


def _submit(kind: str, wait: bool | None = None) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from services.cli.operations import submit

        return submit(kind, args.asset_id, wait=args.wait if wait is None else wait,
                      force=getattr(args, "force", False))

    return run


def _ops_ls(args: argparse.Namespace) -> int:
    from services.cli.operations import list_operations

    return list_operations(asset_id=args.asset or "", status=args.status or "",
                           kind=args.type or "", limit=args.limit)


def _ops_watch(args: argparse.Namespace) -> int:
    from services.cli.operations import watch

    return watch(args.operation_id)


def _ops_cancel(args: argparse.Namespace) -> int:
    from services.cli.operations import cancel

    return cancel(args.operation_id)


def _events(args: argparse.Namespace) -> int:
    from services.cli.events import tail_events

    return tail_events(args.subject)


def _keys_create(args: argparse.Namespace) -> int:
    from services.cli.keys import create_key

    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    return create_key(args.name, models=models, admin=args.admin, rpm=args.rpm, tpm=args.tpm,
                      max_parallel=args.max_parallel, budget_tokens=args.budget_tokens,
                      budget_usd=args.budget_usd, budget_period=args.budget_period,
                      expires_in=args.expires)


def _keys_ls(args: argparse.Namespace) -> int:
    from services.cli.keys import list_keys

    return list_keys()


def _keys_revoke(args: argparse.Namespace) -> int:
    from services.cli.keys import revoke_key

    return revoke_key(args.name)


def _add_key_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],  # noqa: SLF001
) -> None:
    """`keys create|ls|revoke`, over the router's admin API with the admin key."""
    keys = commands.add_parser("keys", help="API keys (needs the admin key: ROUNDHOUSE_ADMIN_KEY "
                               "or $ROUNDHOUSE_HOME/admin.key)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = key_commands.add_parser("create", help="create a key and print its secret (shown once)")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--models", metavar="ID,...", help="asset ids or aliases it may use "
                        "(default: every model)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--max-parallel", type=int, help="requests in flight at once")
    create.add_argument("--budget-tokens", type=int, help="tokens per budget period")
    create.add_argument("--budget-usd", type=float, help="US dollars per budget period")
    create.add_argument("--budget-period", metavar="DURATION", help="budget period: 30d, 12h, ...")
    create.add_argument("--expires", metavar="DURATION", help="stops working after: 90d, ...")
    create.add_argument("--admin", action="store_true", help="may use the admin API")
    create.set_defaults(func=_keys_create)
    ls = key_commands.add_parser("ls", help="list keys: name, masked prefix, limits, usage, expiry")
    ls.set_defaults(func=_keys_ls)
    revoke = key_commands.add_parser("revoke", help="revoke a key; every router refuses it at once")
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(func=_keys_revoke)


def _usage(args: argparse.Namespace) -> int:
    from services.cli.usage import show_usage

    return show_usage(args.by, since=args.since, until=args.until)


def _add_usage_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],  # noqa: SLF001
) -> None:
    """`usage [--by key|asset|day]`, over the router's admin API."""
    usage = commands.add_parser("usage", help="requests, errors, tokens, cost and latency from the "
                                "usage ledger, per key, asset or day")
    usage.add_argument("--by", choices=("key", "asset", "day"), default="key",
                       help="group per key (default), asset or day (UTC)")
    usage.add_argument("--since", metavar="TIME", help="start, RFC 3339 (default: 30 days ago)")
    usage.add_argument("--until", metavar="TIME", help="end, RFC 3339 (default: now)")
    usage.set_defaults(func=_usage)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_operation_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],  # noqa: SLF001
) -> None:
    """`models install|rm|profile|load|unload`'s siblings: `ops ls|watch|cancel` and `events`."""
    ops = commands.add_parser("ops", help="operations of the jobs service")
    op_commands = ops.add_subparsers(dest="ops_command", required=True, metavar="COMMAND")
    ls = op_commands.add_parser("ls", help="list operations, newest first")
    ls.add_argument("--asset", help="only operations on this asset")
    ls.add_argument("--status", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    ls.add_argument("--type", choices=("install", "load", "unload", "delete", "profile"))
    ls.add_argument("--limit", type=_positive, default=50, help="at most this many (default 50)")
    ls.set_defaults(func=_ops_ls)
    watch = op_commands.add_parser("watch", help="follow an operation until it finishes")
    watch.add_argument("operation_id", metavar="ID")
    watch.set_defaults(func=_ops_watch)
    cancel = op_commands.add_parser("cancel", help="cancel a queued or running operation")
    cancel.add_argument("operation_id", metavar="ID")
    cancel.set_defaults(func=_ops_cancel)

    events = commands.add_parser("events", help="tail lifecycle events from NATS")
    events.add_argument("--subject", default=None, metavar="PATTERN",
                        help="NATS subject pattern, e.g. 'job.>' (default: roundhouse.events.>)")
    events.set_defaults(func=_events)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `roundhouse` command."""
    parser = argparse.ArgumentParser(prog="roundhouse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="start the whole stack (embedded Postgres and NATS "
                             "unless ROUNDHOUSE_DATABASE_URL / ROUNDHOUSE_NATS_URL are set)")
    up.add_argument("--catalog", default=None, help="folder of asset YAML to apply at start "
                    "(default: the built-in catalog)")
    up.set_defaults(func=_up)

    for name in ("registry", "router", "worker", "jobs"):
        service = commands.add_parser(name, help=f"run the {name} service alone")
        service.set_defaults(func=_run_service(name))

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser("upgrade", help="apply migrations")
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(func=_db_upgrade)

    apply = commands.add_parser("apply", help="create or update assets from YAML")
    apply.add_argument("-f", "--file", required=True, help="a YAML file or a folder of them")
    apply.add_argument("--dry-run", action="store_true", help="validate and show, store nothing")
    apply.set_defaults(func=_apply)

    models = commands.add_parser("models", help="model assets")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    ls = model_commands.add_parser("ls", help="list assets, grouped by kind")
    ls.set_defaults(func=_models_ls)
    for name, kind, what in (("install", "install", "fetch into the model store"),
                             ("rm", "delete", "unload, remove from the store and the registry"),
                             ("profile", "profile", "load if needed, measure load time, memory and speed")):
        command = model_commands.add_parser(name, help=f"{what} (a `{kind}` operation)")
        command.add_argument("asset_id", metavar="ID")
        command.add_argument("--wait", action="store_true", help="follow it until it finishes")
        command.set_defaults(func=_submit(kind))
    for name, what in (("load", "load onto a worker"), ("unload", "unload from every worker")):
        command = model_commands.add_parser(name, help=f"{what} and wait for the outcome")
        command.add_argument("asset_id", metavar="ID")
        command.add_argument("--no-wait", dest="wait", action="store_false",
                             help="print the operation id and return at once")
        command.add_argument("--force", action="store_true",
                             help="apply even where a safety rule would refuse")
        command.set_defaults(func=_submit(name))

    _add_operation_commands(commands)
    _add_key_commands(commands)
    _add_usage_command(commands)
    add_stats_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `roundhouse` console script."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
