"""The port checks of ``scripts/run_stack.sh``: is a port free, and is a process it started
alive and listening on its own port?

``python scripts/stack_check.py free [--host H] NAME:PORT:VARIABLE ...`` exits 1 with one line
for the first port something already listens on (a Redis there is never used: the stack's
Redis is one it starts itself); ``python scripts/stack_check.py bound --name N --pid P --port
PORT [--timeout S] [--log PATH]`` waits until process ``P`` (or a process it
started) listens on ``PORT``, and exits 1 with one line when it exits first, when another
process holds the port, or when it does not listen in time.

"Listens" is read from Linux's ``/proc``: the process's socket inodes (``/proc/<pid>/fd``)
against the listening sockets of the port (``/proc/net/tcp`` and ``tcp6``, state ``0A``).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["listening_inodes", "port_in_use", "process_inodes", "wait_bound"]

_LISTEN = "0A"


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` (as a server would, with ``SO_REUSEADDR``) fails because
    something listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def listening_inodes(port: int, proc: Path = Path("/proc")) -> set[int]:
    """The inodes of the sockets listening on ``port`` (any address, IPv4 or IPv6)."""
    found: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[9]))
    return found


def _children(pid: int, proc: Path) -> list[int]:
    kids: list[int] = []
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return kids
    for task in tasks:
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def process_inodes(pid: int, proc: Path = Path("/proc")) -> set[int] | None:
    """The socket inodes held by ``pid`` and the processes it started; ``None`` when ``pid``
    is gone (or a zombie: exited, not yet reaped)."""
    if not _alive(pid, proc):
        return None
    inodes: set[int] = set()
    todo, seen = [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        fd_dir = proc / str(current) / "fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(fd_dir / name)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
        todo += _children(current, proc)
    return inodes


def _alive(pid: int, proc: Path) -> bool:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return False
    # The state follows the command name in parentheses (which may itself hold spaces).
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_bound(
    pid: int, port: int, *, timeout_s: float = 30.0, interval_s: float = 0.1
) -> str | None:
    """Wait until ``pid`` (or a process it started) listens on ``port``.

    Returns:
        ``None`` once it does; otherwise why not: ``"exited"``, ``"held by another
        process"`` or ``"not listening"`` (after ``timeout_s``).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        mine = process_inodes(pid)
        if mine is None:
            return "exited"
        listening = listening_inodes(port)
        if mine & listening:
            return None
        if time.monotonic() >= deadline:
            return "held by another process" if listening else "not listening"
        time.sleep(interval_s)


def _free(host: str, entries: Sequence[str]) -> int:
    for entry in entries:
        name, port_text, variable = entry.split(":", 2)
        port = int(port_text)
        if not port_in_use(host, port):
            continue
        if name == "redis":
            print(
                f"run_stack: port {port} on {host} is already in use, and run_stack uses only "
                "a Redis it starts itself (its own data, ACL users and settings): stop what "
                f"listens there or set {variable}",
                file=sys.stderr,
            )
        else:
            print(
                f"run_stack: port {port} on {host} (for {name}) is already in use: stop what "
                f"listens there or set {variable}",
                file=sys.stderr,
            )
        return 1
    return 0


def _bound(args: argparse.Namespace) -> int:
    why = wait_bound(args.pid, args.port, timeout_s=args.timeout)
    if why is None:
        return 0
    log = f"; see {args.log}" if args.log else ""
    if why == "exited":
        text = f"{args.name} (pid {args.pid}) exited before listening on port {args.port}"
    elif why == "held by another process":
        text = (
            f"{args.name} (pid {args.pid}) is not the process listening on port {args.port}: "
            "another one is"
        )
    else:
        text = (
            f"{args.name} (pid {args.pid}) is not listening on port {args.port} after "
            f"{args.timeout:g} s"
        )
    print(f"run_stack: {text}{log}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run one check; return its exit status."""
    parser = argparse.ArgumentParser(prog="stack_check.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    free = commands.add_parser("free", help="fail if a port is already in use")
    free.add_argument("--host", default="127.0.0.1")
    free.add_argument("entries", nargs="+", metavar="NAME:PORT:VARIABLE")
    bound = commands.add_parser("bound", help="wait until a process listens on its port")
    bound.add_argument("--name", required=True)
    bound.add_argument("--pid", type=int, required=True)
    bound.add_argument("--port", type=int, required=True)
    bound.add_argument("--timeout", type=float, default=30.0)
    bound.add_argument("--log", default="")
    args = parser.parse_args(argv)
    if args.command == "free":
        return _free(args.host, args.entries)
    return _bound(args)


if __name__ == "__main__":
    sys.exit(main())
