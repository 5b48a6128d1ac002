"""warden-collector: serve the API, mint bearer tokens, issue enrollment tokens.
Token commands work directly on the database and state dir (no server needed)."""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import stat
import sys
from pathlib import Path

from collector.config import CollectorConfig, ConfigError, load_config, parse_listen
from collector.timeparse import TimeFormatError, parse_duration_ns

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
# What the packaged systemd unit passes to `serve`: commands run without --config read it too,
# so they use the service's database and state dir.
DEFAULT_CONFIG = "/etc/warden/collector.yaml"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"collector.yaml (default: $WARDEN_COLLECTOR_CONFIG, else {DEFAULT_CONFIG} if it "
                             f"exists, else built-in defaults)")
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
    revoke = token.add_parser("revoke", parents=[common], help="revoke a minted token (by its jti, or the token)",
                              description="Revoke a token minted by `token create`: give its jti (printed by "
                                          "`token create`) or the token itself.")
    revoke.add_argument("jti", metavar="JTI|TOKEN")

    enroll = commands.add_parser("enroll", help="agent enrollment").add_subparsers(
        dest="enroll_command", required=True, metavar="ACTION")
    enroll_create = enroll.add_parser(
        "create", parents=[common], help="issue a one-time agent enrollment token",
        description="Issue a one-time enrollment token for one agent. It enrolls an agent id that is not enrolled "
                    "yet (with --agent: only that id); an enrolled agent id keeps its key. To replace an enrolled "
                    "agent's key, create a rotation token: --agent ID --rotate.")
    enroll_create.add_argument("--ttl", default="1h", help="lifetime (default 1h)")
    enroll_create.add_argument("--agent", metavar="ID", help="the token enrolls only this agent id")
    enroll_create.add_argument("--rotate", action="store_true",
                               help="with --agent: the token may replace that enrolled agent's key (key rotation); "
                                    "the old key stays on record for the sequence numbers it signed")
    enroll_create.add_argument("--actor", default=os.environ.get("SUDO_USER") or os.environ.get("USER") or "cli",
                               help="who creates the token (recorded with it and with the enrollment; default "
                                    "$SUDO_USER or $USER)")
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


def default_config_path() -> str | None:
    """--config when not given: $WARDEN_COLLECTOR_CONFIG, else the packaged file if it exists."""
    from_env = os.environ.get("WARDEN_COLLECTOR_CONFIG")
    if from_env:
        return from_env
    return DEFAULT_CONFIG if os.path.lexists(DEFAULT_CONFIG) else None


def _load(args) -> CollectorConfig:
    config = load_config(args.config or default_config_path())
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


def _state_files(config: CollectorConfig) -> list[Path]:
    """What the collector keeps in its state dir: the signing key, and the SQLite files when
    the database lives there (the default)."""
    from collector.auth import KEY_FILE
    state = Path(config.state_dir)
    names = [KEY_FILE]
    if config.database_url.startswith("sqlite:///"):
        database = Path(config.database_url[len("sqlite:///"):])
        if database.parent.resolve() == state.resolve():
            names += [database.name + suffix for suffix in ("", "-wal", "-shm", "-journal", ".writer-lock")]
    return [state / name for name in names]


def _hand_over(path: Path, uid: int, gid: int) -> None:
    """chown a root-owned state file (left by an earlier CLI run as root) to the state dir's
    owner, mode at most 0600. The directory belongs to that user, so the file is opened without
    following links (O_PATH: no open side effects) and changed through that descriptor only."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # absent, or a symlink (ELOOP): not ours to touch
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == 0:
            os.chown(f"/proc/self/fd/{fd}", uid, gid)
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(info.st_mode) & 0o600)
    except OSError:
        pass
    finally:
        os.close(fd)


def _become_state_dir_owner(config: CollectorConfig) -> None:
    """Run as root (e.g. `sudo warden-collector enroll create`), do the work as the user who
    owns the state dir (the packaged service's warden-collector), so the database, its
    writer lock and the signing key it creates stay usable by the service; root then also never
    follows links another user controls. A missing or root-owned state dir changes nothing."""
    if os.geteuid() != 0:
        return
    try:
        info = os.stat(config.state_dir)
    except OSError:
        return
    if info.st_uid == 0 or not stat.S_ISDIR(info.st_mode):
        return
    import pwd
    uid = info.st_uid
    try:
        user = pwd.getpwuid(uid)
        gid, groups = user.pw_gid, os.getgrouplist(user.pw_name, user.pw_gid)
    except KeyError:
        gid, groups = info.st_gid, [info.st_gid]
    if os.path.exists("/proc/self/fd"):
        for path in _state_files(config):
            _hand_over(path, uid, gid)
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise PermissionError(f"cannot switch to uid {uid}, the owner of the state dir {config.state_dir}, "
                              f"before using it: {exc.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError(f"could not switch to uid {uid} (the owner of {config.state_dir})")


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


def _ttl_seconds(text: str, name: str) -> int:
    """A token lifetime in whole seconds; under one second the token would be born expired."""
    ttl_ns = parse_duration_ns(text)
    if ttl_ns < 10**9:
        raise ValueError(f"{name} {text!r} is shorter than one second: the token would already be expired; "
                         f"use e.g. 30m or 8h")
    return ttl_ns // 10**9


def cmd_token_create(args, config: CollectorConfig) -> int:
    import jwt

    from collector.auth import CollectorKeys, mint_api_token
    ttl_s = _ttl_seconds(args.ttl, "--ttl") if args.ttl else _ttl_seconds(config.tokens.default_ttl,
                                                                          "tokens.default_ttl")
    store = _open_store(config)
    keys = CollectorKeys(config.state_dir)
    with store.write() as connection:
        token = mint_api_token(connection, keys, role=args.role, subject=args.subject, ttl_s=ttl_s,
                               issuer=config.tokens.issuer, audience=config.tokens.audience)
    store.dispose()
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    if args.json:
        print(json.dumps({"token": token, "jti": jti, "role": args.role, "subject": args.subject, "ttl_s": ttl_s}))
    else:
        print(token)  # stdout: the token alone, for TOKEN=$(warden-collector token create ...)
        print(f"jti {jti} (revoke with: warden-collector token revoke {jti})", file=sys.stderr)
    return EXIT_OK


def _jti_of(value: str, config: CollectorConfig) -> str:
    """`token revoke` takes a jti or the token itself (a JWT: three dot-separated parts)."""
    if value.count(".") != 2:
        return value
    import jwt

    from collector.auth import KEY_FILE, CollectorKeys
    try:
        jti = jwt.decode(value, options={"verify_signature": False}).get("jti")
    except jwt.InvalidTokenError as exc:
        raise ValueError(f"cannot read that token: {exc}; give the token from `token create` or its jti") from None
    if not isinstance(jti, str) or not jti:
        raise ValueError("that token has no jti claim: it was not minted by `warden-collector token create`")
    if (Path(config.state_dir) / KEY_FILE).exists():  # nothing was minted without a key: nothing to check
        try:
            jwt.decode(value, CollectorKeys(config.state_dir).public_key, algorithms=["EdDSA"],
                       options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                "verify_aud": False, "verify_iss": False})
        except jwt.InvalidTokenError:
            raise ValueError(f"that token was not signed by this collector's key "
                             f"({Path(config.state_dir) / KEY_FILE}): check --config / --state-dir") from None
    return jti


def cmd_token_revoke(args, config: CollectorConfig) -> int:
    from collector.auth import revoke_api_token
    jti = _jti_of(args.jti.strip(), config)
    store = _open_store(config)
    with store.write() as connection:
        found = revoke_api_token(connection, jti)
    store.dispose()
    if not found:
        print(f"error: no minted token with jti {jti}", file=sys.stderr)
        return EXIT_FAIL
    print(f"revoked {jti}")
    return EXIT_OK


def cmd_enroll_create(args, config: CollectorConfig) -> int:
    from sqlalchemy import select

    from collector.auth import create_enrollment_token
    from collector.storage.schema import agents
    if args.rotate and not args.agent:
        raise ValueError("--rotate needs --agent ID: a rotation token replaces the key of one enrolled agent")
    agent_id = args.agent.strip() if args.agent else None
    if args.agent is not None and not (agent_id and len(agent_id) <= 200):
        raise ValueError("--agent must be 1..200 characters")
    ttl_s = _ttl_seconds(args.ttl, "--ttl")
    created_by = f"cli:{args.actor}"
    store = _open_store(config)
    try:
        with store.write() as connection:
            enrolled = agent_id is not None and connection.execute(
                select(agents.c.agent_id).where(agents.c.agent_id == agent_id)).first() is not None
            if args.rotate and not enrolled:
                print(f"error: no agent {agent_id!r} is enrolled here: nothing to rotate (`warden agents` lists "
                      f"them; a first enrollment needs no --rotate)", file=sys.stderr)
                return EXIT_FAIL
            token = create_enrollment_token(connection, ttl_s, agent_id=agent_id, rotate=args.rotate,
                                            created_by=created_by)
    finally:
        store.dispose()
    if args.json:
        print(json.dumps({"token": token, "ttl_s": ttl_s, "agent_id": agent_id, "rotate": args.rotate,
                          "created_by": created_by}))
    else:
        print(token)  # stdout: the token alone
        if args.rotate:
            print(f"key rotation token for agent {agent_id}: enrolling with it replaces the agent's key "
                  f"(created by {created_by})", file=sys.stderr)
        elif enrolled:
            print(f"note: agent {agent_id} is already enrolled: this token only re-enrolls it with the same key; "
                  f"add --rotate to replace its key", file=sys.stderr)
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
    # The database and the signing key are private to the collector (as the unit's UMask=0077).
    umask = os.umask(0o077)
    try:
        return _run(args)
    finally:
        os.umask(umask)


def _run(args) -> int:
    try:
        config = _load(args)
        _become_state_dir_owner(config)
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
    except PermissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except Exception as exc:  # database unreachable, permissions, ...
        from sqlalchemy.exc import OperationalError
        if isinstance(exc, OperationalError):
            print(f"error: cannot use the database: {exc.orig}", file=sys.stderr)
            return EXIT_FAIL
        raise
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
