"""The `rulesvc` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rulesvc import __version__
from rulesvc.config import CONFIG_FILE_ENV, SETTINGS_DOC, ConfigError, Settings, load_settings


def _settings_epilog() -> str:
    defaults = Settings()
    rows = [f"  {d.env:<30} {d.help} (default: {getattr(defaults, d.field)!s})" for d in SETTINGS_DOC]
    return (
        "settings (environment variables; the same names in lower case, without the RULESVC_ prefix,\n"
        f"work as keys in the TOML file given by --config or {CONFIG_FILE_ENV}):\n" + "\n".join(rows)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rulesvc", description="Real-time trigger-marketing engine.")
    parser.add_argument("--version", action="version", version=f"rulesvc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the HTTP service",
        description="Run the HTTP service. Without MONGODB_URI it starts and stops its own mongod.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="address to listen on (RULESVC_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (RULESVC_PORT)")
    serve.add_argument("--config", metavar="FILE", help=f"TOML settings file ({CONFIG_FILE_ENV})")
    return parser


def serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from rulesvc import logs
    from rulesvc.api import create_app
    from rulesvc.mongod import MongodError

    settings = load_settings(args.config).with_overrides(host=args.host, port=args.port)
    logs.configure(settings.log_format, settings.log_level)
    try:
        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            print=None,
            access_log=None,
            shutdown_timeout=30,
        )
    except MongodError as exc:
        print(f"rulesvc: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
    except ConfigError as exc:
        print(f"rulesvc: configuration error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
