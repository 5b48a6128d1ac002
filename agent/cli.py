"""`warden-agent`: run the daemon, restart it, release what a stopped one left, check a host and
config, validate and dry-run policies."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

DEFAULT_CONFIG = "/etc/warden/agent.yaml"


def _cmd_run(args) -> int:
    from agent import config as config_mod
    from agent.daemon import run_forever
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    return run_forever(cfg)


def _cmd_check(args) -> int:
    from agent.check import run_checks
    problems, notes = run_checks(args.config)
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems, "checked": notes}, indent=2))
    else:
        for note in notes:
            print(f"ok   {note}")
        for problem in problems:
            print(f"FAIL {problem}")
        print("all checks passed" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0


def _cmd_policy_check(args) -> int:
    try:
        from enforcer.policy.cli import cmd_check
    except ImportError:
        print("the policy engine is not installed in this build", file=sys.stderr)
        return 1
    return cmd_check(args.file)


def _cmd_policy_test(args) -> int:
    """Exit codes as enforcer.policy.cli.cmd_test: 0 allowed, 1 denied, 2 approval required,
    3 the config, policy or input could not be used."""
    try:
        from enforcer.policy.cli import EXIT_ERROR, cmd_test
    except ImportError:
        print("the policy engine is not installed in this build", file=sys.stderr)
        return 1
    if bool(args.sql) == bool(args.http):
        print("give exactly one of --sql or --http", file=sys.stderr)
        return EXIT_ERROR
    try:
        attrs = json.loads(args.attrs) if args.attrs else None
    except json.JSONDecodeError as exc:
        print(f"--attrs is not JSON ({exc}); e.g. --attrs '{{\"team\": \"payments\"}}'", file=sys.stderr)
        return EXIT_ERROR
    if attrs is not None and not isinstance(attrs, dict):
        print("--attrs must be a JSON object of principal attributes", file=sys.stderr)
        return EXIT_ERROR
    # The agent's identity groups decide as much as the policy text (`principal in Group::...`):
    # the dry run reads them from the config, as the running agent does.
    from agent import config as config_mod
    config = None
    if args.policy is None or args.config != DEFAULT_CONFIG or os.path.exists(args.config):
        try:
            config = config_mod.load(args.config)
        except config_mod.ConfigError as exc:
            print(exc, file=sys.stderr)
            return EXIT_ERROR
    policy = args.policy or config.policy_path
    if not policy:
        print("no policy file: pass --policy FILE or set policy.path in the config", file=sys.stderr)
        return EXIT_ERROR
    return cmd_test(policy, args.identity, args.target, sql=args.sql, http=args.http,
                    identity_attrs=attrs, as_json=args.json,
                    groups=config.policy_groups() if config is not None else None)


def _load_config(path: str):
    """The agent config, or None after printing what is wrong with it (file:line and the fix)."""
    from agent import config as config_mod
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _cmd_ca(args) -> int:
    """The agent's local CA: what workloads using sslmode=verify-full must trust."""
    from enforcer.tls import LocalCA
    cfg = _load_config(args.config)
    if cfg is None:
        return 1
    ca = LocalCA.load_or_create(os.path.join(cfg.state_dir, "ca"))
    if args.path:
        print(ca.cert_path)
    else:
        sys.stdout.write(ca.cert_pem().decode())
    return 0


def _main_pid(unit: str) -> tuple[int, str]:
    """The unit's main pid (0 when it has none) and its ActiveState, as systemd reports them."""
    import subprocess
    out = subprocess.run(["systemctl", "show", "--property=MainPID,ActiveState", unit],
                         capture_output=True, text=True, check=False, timeout=30)
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return int(props.get("MainPID") or 0), props.get("ActiveState", "unknown")


def _gone(pid: int) -> bool:
    """Exited (or a zombie its parent has not reaped yet: it holds nothing any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def restart_agent(pid: int, status=None, timeout: float = 90.0, out=sys.stdout) -> int:
    """Ask the agent at `pid` to hand over (SIGUSR2) and wait for it to stop; with `status` (a
    callable answering the supervisor's (main pid, state), as systemd's MainPID and
    ActiveState), also for the next run to be up. Returns the exit code for the CLI."""
    import time

    from agent.daemon import HANDOVER_SIGNAL
    started = time.monotonic()
    deadline = started + timeout
    try:
        os.kill(pid, HANDOVER_SIGNAL)
    except ProcessLookupError:
        print(f"no process {pid}", file=sys.stderr)
        return 1
    while not _gone(pid):
        if time.monotonic() > deadline:
            print(f"the agent (pid {pid}) did not stop within {timeout:.0f}s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    if status is None:
        print(f"the agent (pid {pid}) stopped with its programs attached: governed connects are "
              f"refused until it runs again; start it now", file=out)
        return 0
    while True:
        new_pid, state = status()
        if new_pid and new_pid != pid and state == "active":
            print(f"handed over from pid {pid} to pid {new_pid} in {time.monotonic() - started:.1f}s; "
                  f"governed connects were refused meanwhile, none went direct", file=out)
            return 0
        if state == "failed" or time.monotonic() > deadline:
            print(f"the agent did not come back ({state}); governed connects stay refused until it "
                  f"runs", file=sys.stderr)
            return 1
        time.sleep(0.1)


def _cmd_restart(args) -> int:
    """A planned restart with no moment of direct access: the running agent is asked (SIGUSR2)
    to stop with its BPF programs left attached, so governed connects are refused, not sent
    direct, until the next run has attached its own and taken the old ones off."""
    if args.pid:
        return restart_agent(args.pid, timeout=args.timeout)
    try:
        pid, state = _main_pid(args.unit)
    except (OSError, ValueError) as exc:
        print(f"cannot ask systemd for {args.unit} ({exc}); pass --pid", file=sys.stderr)
        return 1
    if not pid:
        print(f"{args.unit} is not running ({state}); start it with `systemctl start {args.unit}`",
              file=sys.stderr)
        return 1
    code = restart_agent(pid, status=lambda: _main_pid(args.unit), timeout=args.timeout)
    if code:
        print(f"see `journalctl -u {args.unit}`", file=sys.stderr)
    return code


def _cmd_release(args) -> int:
    """Detach what stopped agent runs left attached, so governed connects go direct again."""
    from agent import cgroups
    from agent.bpfmgr import BpfUnavailable, release_left
    from agent.daemon import HANDOVER_FILE
    cfg = _load_config(args.config)
    if cfg is None:
        return 1
    try:
        mount = cgroups.cgroup2_mount()
        paths = [cgroups.abs_path(c, mount) for c in cfg.scope_cgroups]
        removed, kept = release_left(paths, os.path.join(cfg.state_dir, HANDOVER_FILE))
    except (cgroups.CgroupError, BpfUnavailable, OSError) as exc:
        print(f"cannot release: {exc}", file=sys.stderr)
        return 1
    if removed:
        print(f"detached {removed} program attachment(s) left by a stopped agent: governed connects now "
              f"go direct, unrecorded, until the agent runs")
    else:
        print("nothing was left attached by a stopped agent")
    if kept:
        print(f"{kept} attachment(s) belong to a running agent and were kept; stop it first "
              f"(with agent.on_stop: detach) to detach those")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warden-agent", description="Warden host agent")
    parser.add_argument("--log-level", default=os.environ.get("WARDEN_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent in the foreground (systemd Type=notify)")
    run.add_argument("--config", default=DEFAULT_CONFIG)
    run.set_defaults(func=_cmd_run)

    restart = sub.add_parser("restart", help="restart the running agent with no moment of direct access "
                                             "(package upgrades use it)")
    restart.add_argument("--unit", default="warden-agent.service", help="the systemd unit running the agent")
    restart.add_argument("--pid", type=int, help="the agent's pid, when systemd does not run it")
    restart.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for stop and start")
    restart.set_defaults(func=_cmd_restart)

    release = sub.add_parser("release", help="detach the BPF programs a stopped agent left attached "
                                             "(on_stop: hold, a handover, a crash); package removal uses it")
    release.add_argument("--config", default=DEFAULT_CONFIG)
    release.set_defaults(func=_cmd_release)

    check = sub.add_parser("check", help="validate the config and the host; exit 1 listing every problem")
    check.add_argument("--config", default=DEFAULT_CONFIG)
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=_cmd_check)

    ca = sub.add_parser("ca", help="print the agent's local CA certificate (clients with verify-full trust it)")
    ca.add_argument("--config", default=DEFAULT_CONFIG)
    ca.add_argument("--path", action="store_true", help="print the certificate's file path instead")
    ca.set_defaults(func=_cmd_ca)

    policy = sub.add_parser("policy", help="validate policies and dry-run decisions")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    pcheck = psub.add_parser("check", help="validate a Cedar policy file")
    pcheck.add_argument("file")
    pcheck.set_defaults(func=_cmd_policy_check)
    ptest = psub.add_parser("test", help="dry-run one decision")
    ptest.add_argument("--identity", required=True)
    ptest.add_argument("--target", required=True)
    ptest.add_argument("--sql")
    ptest.add_argument("--http", help='e.g. "GET https://api.internal/v1/customers/7"')
    ptest.add_argument("--policy", help="policy file (default: policy.path from --config)")
    ptest.add_argument("--config", default=DEFAULT_CONFIG,
                       help="agent config: its policy.path and its identities' groups (read when present)")
    ptest.add_argument("--attrs", help="principal attributes as JSON")
    ptest.add_argument("--json", action="store_true")
    ptest.set_defaults(func=_cmd_policy_test)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
