"""warden-collector: serve the API, mint bearer tokens, issue enrollment tokens.
Token commands work directly on the database and state dir (no server needed)."""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys

from collector.config import CollectorConfig, ConfigError, load_config, parse_listen
from collector.timeparse import TimeFormatError, parse_duration_ns

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=os.environ.get("WARDEN_COLLECTOR_CONFIG"),
                        help="collector.yaml (default: $WARDEN_COLLECTOR_CONFIG, else built-in defaults)")
    parser.add_argument("--db", metavar="URL", help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB (overrides config)")
    parser.add_argument("--state-dir", metavar="DIR", help="where the signing key lives (overrides config)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _common(common)
    parser = argparse.ArgumentParser(prog="warden-collector", description="Warden collector service and administration.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the HTTP API",
                                description="Run the collector API (HTTPS; plain HTTP only on loopback).")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (overrides config)")
    serve.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (with --tls-key)")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    token = commands.add_parser("token", help="bearer tokens for people and tools").add_subparsers(
        dest="token_command", required=True, metavar="ACTION")
    create = token.add_parser("create", parents=[common], help="mint a bearer token",
                              description="Mint a bearer token signed by the collector's key.")
    create.add_argument("--role", required=True, choices=["auditor", "approver", "admin"])
    create.add_argument("--subject", required=True, help="who the token is for (recorded on every access)")
    create.add_argument("--ttl", default=None, help="lifetime, e.g. 8h, 30m, 7d (default: tokens.default_ttl, 8h)")
    create.add_argument("--json", action="store_true", help="print JSON")
    revoke = token.add_parser("revoke", parents=[common], help="revoke a minted token by its jti")
    revoke.add_argument("jti")

    enroll = commands.add_parser("enroll", help="agent enrollment").add_subparsers(
        dest="enroll_command", required=True, metavar="ACTION")
    enroll_create = enroll.add_parser("create", parents=[common], help="issue a one-time agent enrollment token",
                                      description="Issue a one-time enrollment token for one agent.")
    enroll_create.add_argument("--ttl", default="1h", help="lifetime (default 1h)")
    enroll_create.add_argument("--json", action="store_true", help="print JSON")

    retention = commands.add_parser("retention", help="purge old evidence").add_subparsers(
        dest="retention_command", required=True, metavar="ACTION")
    retention_run = retention.add_parser(
        "run", parents=[common], help="purge batches, events and sessions older than N days",
        description="Purge evidence older than retention.days (or --days). A signed checkpoint per agent keeps "
                    "what remains verifiable; each purge is written to the access log.")
    retention_run.add_argument("--days", type=int, help="override retention.days from the config")
    retention_run.add_argument("--actor", default=os.environ.get("USER") or "cli",
                               help="who runs the purge (recorded in the access log; default $USER)")
    retention_run.add_argument("--json", action="store_true", help="print JSON")

    commands.add_parser("migrate", parents=[common], help="apply database migrations and exit")
    return parser


def _load(args) -> CollectorConfig:
    config = load_config(args.config)
    if args.db:
        config.db = args.db
    if args.state_dir:
        config.state_dir = args.state_dir
    return config


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open_store(config: CollectorConfig):
    from collector.storage.engine import Store
    store = Store(config.database_url)
    store.migrate()
    return store


def cmd_serve(args, config: CollectorConfig) -> int:
    if args.listen:
        config.listen = args.listen
    if args.tls_cert or args.tls_key:
        config.tls_cert, config.tls_key = args.tls_cert, args.tls_key
    host, port = parse_listen(config.listen)
    if bool(config.tls_cert) != bool(config.tls_key):
        print("error: TLS needs both a certificate and a key (--tls-cert and --tls-key)", file=sys.stderr)
        return EXIT_USAGE
    if not config.tls_cert and not _is_loopback(host):
        print(f"error: refusing plain HTTP on {host}: agents send evidence and tokens over this port. "
              f"Configure tls.cert and tls.key (or --tls-cert/--tls-key), or listen on 127.0.0.1 for development.",
              file=sys.stderr)
        return EXIT_USAGE
    import uvicorn
    from collector.app import create_app
    app = create_app(config)
    server = _SystemdServer(uvicorn.Config(app, host=host, port=port, ssl_certfile=config.tls_cert,
                                           ssl_keyfile=config.tls_key, log_level=args.log_level,
                                           proxy_headers=False, server_header=False))
    server.run()
    return EXIT_OK


def _systemd_server_class():
    import asyncio
    import os

    import uvicorn

    from agent.sdnotify import notify

    class SystemdServer(uvicorn.Server):
        """uvicorn that tells systemd when it is ready (Type=notify) and pets the watchdog."""

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                notify("READY=1\nSTATUS=serving")
                usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
                if usec:
                    self._watchdog = asyncio.create_task(self._pet(usec / 2e6))

        async def _pet(self, interval: float) -> None:
            while not self.should_exit:
                notify("WATCHDOG=1")
                await asyncio.sleep(interval)

        async def shutdown(self, sockets=None):
            notify("STOPPING=1")
            await super().shutdown(sockets=sockets)

    return SystemdServer


def _SystemdServer(config):
    return _systemd_server_class()(config)


def cmd_token_create(args, config: CollectorConfig) -> int:
    from collector.auth import CollectorKeys, mint_api_token
    ttl_ns = parse_duration_ns(args.ttl or config.tokens.default_ttl)
    store = _open_store(config)
    keys = CollectorKeys(config.state_dir)
    with store.write() as connection:
        token = mint_api_token(connection, keys, role=args.role, subject=args.subject, ttl_s=ttl_ns // 10**9,
                               issuer=config.tokens.issuer, audience=config.tokens.audience)
    store.dispose()
    if args.json:
        print(json.dumps({"token": token, "role": args.role, "subject": args.subject, "ttl_s": ttl_ns // 10**9}))
    else:
        print(token)
    return EXIT_OK


def cmd_token_revoke(args, config: CollectorConfig) -> int:
    from collector.auth import revoke_api_token
    store = _open_store(config)
    with store.write() as connection:
        found = revoke_api_token(connection, args.jti)
    store.dispose()
    if not found:
        print(f"error: no minted token with jti {args.jti}", file=sys.stderr)
        return EXIT_FAIL
    print(f"revoked {args.jti}")
    return EXIT_OK


def cmd_enroll_create(args, config: CollectorConfig) -> int:
    from collector.auth import create_enrollment_token
    ttl_ns = parse_duration_ns(args.ttl)
    store = _open_store(config)
    with store.write() as connection:
        token = create_enrollment_token(connection, ttl_ns // 10**9)
    store.dispose()
    if args.json:
        print(json.dumps({"token": token, "ttl_s": ttl_ns // 10**9}))
    else:
        print(token)
    return EXIT_OK


def cmd_retention_run(args, config: CollectorConfig) -> int:
    from collector.auth import CollectorKeys
    from collector.retention import purge
    days = args.days if args.days is not None else config.retention_days
    if days is None:
        print("error: no retention period: set retention.days in collector.yaml or pass --days N", file=sys.stderr)
        return EXIT_USAGE
    if days < 0:
        print("error: --days must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    store = _open_store(config)
    try:
        result = purge(store, CollectorKeys(config.state_dir).private_key, days=days, actor=f"cli:{args.actor}")
    finally:
        store.dispose()
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return EXIT_OK
    print(f"purged evidence older than {result['before']}: {result['batches']} batch(es), {result['events']} "
          f"event(s), {result['sessions']} session(s)")
    for agent in result["agents"]:
        note = f", {agent['problems']} verification problem(s) in the purged range" if agent["problems"] else ""
        print(f"  {agent['agent_id']}: seq {agent['first_seq']}..{agent['last_seq']} (checkpoint signed){note}")
    return EXIT_OK


def cmd_migrate(_args, config: CollectorConfig) -> int:
    from collector.storage.engine import Store
    store = Store(config.database_url)
    applied = store.migrate()
    print(f"schema version {store.schema_version()} (applied now: {applied or 'none'})")
    store.dispose()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _load(args)
        if args.command == "serve":
            return cmd_serve(args, config)
        if args.command == "token":
            return cmd_token_create(args, config) if args.token_command == "create" else cmd_token_revoke(args, config)
        if args.command == "enroll":
            return cmd_enroll_create(args, config)
        if args.command == "retention":
            return cmd_retention_run(args, config)
        if args.command == "migrate":
            return cmd_migrate(args, config)
    except (ConfigError, TimeFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # database unreachable, permissions, ...
        from sqlalchemy.exc import OperationalError
        if isinstance(exc, OperationalError):
            print(f"error: cannot use the database: {exc.orig}", file=sys.stderr)
            return EXIT_FAIL
        raise
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
