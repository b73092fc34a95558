"""`python -m server.tools.workers N -- COMMAND...`: N local training workers, started and stopped together.

`train --workers` wants the same command on every worker with its own `--worker-index`;
by hand that is N terminals and N free ports. This starts COMMAND N times on free
loopback ports, appending `--workers 127.0.0.1:P0,... --worker-index i`, prints each
worker's output as it comes with its index in front, and exits with the first failure's
code after ending the others, so a worker that dies does not leave the rest waiting at
an all-reduce for a minute. Ctrl-C reaches every worker from the terminal (train then
stops them all at the next sync, the chief exporting the best model so far); the
launcher waits for that, and a second Ctrl-C ends them at once.

    python -m server.tools.workers 2 -- .venv/bin/python -m server train --data d --name big
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

GRACE_S = 10.0  # after a failure, how long the others get to end on SIGTERM before SIGKILL


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free at the time of asking (held together, so none is given twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def worker_commands(command: Sequence[str], ports: Sequence[int]) -> list[list[str]]:
    """`command` once per port, each with the whole cluster and its own index appended."""
    cluster = ",".join(f"127.0.0.1:{p}" for p in ports)
    return [[*command, "--workers", cluster, "--worker-index", str(i)] for i in range(len(ports))]


def _relay(index: int, stream: TextIO, out: TextIO, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(f"[{index}] {line}")
            out.flush()


def run(commands: Sequence[Sequence[str]], out: TextIO = sys.stdout, poll_s: float = 0.1) -> int:
    """Run `commands` at once, relaying their output prefixed by index; 0 if all succeed, else the first
    failure's exit code (1 for a signal), the others ended first."""
    lock, interrupts = threading.Lock(), []
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
             for c in commands]
    relays = [threading.Thread(target=_relay, args=(i, p.stdout, out, lock), daemon=True) for i, p in enumerate(procs)]
    for t in relays:
        t.start()
    # Ctrl-C is counted, never raised: this process must outlive the workers to carry their last lines
    previous = signal.signal(signal.SIGINT, lambda *_: interrupts.append(1))
    code, told = 0, False
    try:
        while any(p.poll() is None for p in procs) and code == 0:
            time.sleep(poll_s)
            if interrupts and not told:
                told = True
                print("workers: Ctrl-C: waiting for the workers to stop (again to end them now)", file=out, flush=True)
            if len(interrupts) > 1:
                code = 130
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is not None and code == 0:
                code = procs[failed].returncode if procs[failed].returncode > 0 else 1
                print(f"workers: worker {failed} exited with {procs[failed].returncode}; ending the others",
                      file=out, flush=True)
        _end(procs)
    finally:
        signal.signal(signal.SIGINT, previous)
    for t in relays:
        t.join(timeout=GRACE_S)
    return code or next((p.returncode if p.returncode > 0 else 1 for p in procs if p.returncode != 0), 0)


def _end(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to those still running, SIGKILL to those still running after GRACE_S."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m server.tools.workers", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s N -- COMMAND [ARG ...]")
    parser.add_argument("n", type=int, metavar="N", help="how many workers (2 or more)")
    if "--" not in argv:
        parser.error("give the command after --")
    split = argv.index("--")
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    if args.n < 2 or not command:
        parser.error("N is 2 or more, and a command follows --")
    commands = worker_commands(command, free_ports(args.n))
    print(f"workers: {args.n} on {commands[0][-3]}", flush=True)
    return run(commands)


if __name__ == "__main__":
    sys.exit(main())
