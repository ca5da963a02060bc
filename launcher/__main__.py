"""``python -m launcher {hostfile|command|env} [options] [-- script args...]``: the shell face of ``launcher``.

Why a CLI: the Slurm scripts must compute per-node values (the node rank) *on each node*,
inside ``srun``; expanding ``$SLURM_NODEID`` once in the batch shell gives every node rank 0 and
hangs the rendezvous. Each subcommand reads the current environment and prints:

- ``hostfile``: DeepSpeed hostfile text (run once, in the batch shell, into a shared path);
- ``command``: this node's launcher command, shell-quoted (``eval`` it, or split it);
- ``env``: ``MASTER_ADDR=.. MASTER_PORT=..`` lines (values shell-quoted) for a launcher-less
  ``srun`` step, whose tasks read their ranks from Slurm's variables themselves.

Errors print one line to stderr and exit with status 2, like argparse usage errors.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping, Sequence

from launcher.commands import (
    deepspeed_command,
    hostfile,
    rendezvous_env,
    resolve_nproc,
    torchrun_command,
    visible_devices_warning,
)
from launcher.slurm import slurm_context

PROG = "python -m launcher"


def _parser() -> argparse.ArgumentParser:
    master = argparse.ArgumentParser(add_help=False)
    master.add_argument("--master-addr", default=None, help="override the first node of SLURM_JOB_NODELIST")
    master.add_argument("--master-port", type=int, default=None, help="override the per-job port")

    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    h = sub.add_parser("hostfile", help="DeepSpeed hostfile for this job")
    h.add_argument("--slots", "--nproc-per-node", dest="nproc", type=int, default=None,
                   help="slots per host (default: GPUs on this node)")  # fmt: skip
    c = sub.add_parser("command", parents=[master], help="this node's launcher command; script after --")
    c.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    c.add_argument("--hostfile", default=None, help="hostfile path (deepspeed, required for >1 node)")
    c.add_argument("--nproc-per-node", dest="nproc", type=int, default=None,
                   help="workers per node (default: GPUs on this node)")  # fmt: skip
    c.add_argument("--rendezvous", choices=("static", "c10d"), default="static", help="torchrun only")
    c.add_argument("--python", default=None, help="run the launcher as PYTHON -m ... instead of its script")
    sub.add_parser("env", parents=[master], help="MASTER_ADDR/MASTER_PORT for a launcher-less srun step")
    return p


def _run(args: argparse.Namespace, script: list[str], env: Mapping[str, str]) -> tuple[str, str | None]:
    """(stdout text, optional warning) for the parsed arguments."""
    ctx = slurm_context(env)
    if args.what == "hostfile":
        return hostfile(ctx, args.nproc), None
    if args.what == "env":
        pairs = rendezvous_env(ctx, addr=args.master_addr, port=args.master_port)
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in pairs.items()), None
    if not script:
        raise ValueError("command needs the training script after '--', e.g. -- ltscale/train.py --config X")
    common = {"nproc_per_node": args.nproc, "python": args.python, "addr": args.master_addr,
              "port": args.master_port}  # fmt: skip
    warning = None
    if args.launcher == "deepspeed":
        cmd = deepspeed_command(ctx, script[0], script[1:], hostfile_path=args.hostfile, **common)
        warning = visible_devices_warning(env, resolve_nproc(ctx, args.nproc))
    else:
        cmd = torchrun_command(ctx, script[0], script[1:], rendezvous=args.rendezvous, **common)
    return shlex.join(cmd) + "\n", warning


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point; ``env`` defaults to ``os.environ`` (tests pass a recorded one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    head, script = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = _parser().parse_args(head)  # usage errors exit 2 from argparse itself
    if script and args.what != "command":
        print(f"{PROG}: error: '{args.what}' takes no script arguments", file=sys.stderr)
        return 2
    try:
        out, warning = _run(args, script, os.environ if env is None else env)
    except (KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{PROG} {args.what}: error: {msg}", file=sys.stderr)
        return 2
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
