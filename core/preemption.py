"""Stopping and restarting a run: the signals that save and exit, --resume auto, and a test-only fault hook.

A preempted or requeued job runs the same command again; with --resume auto it continues from its last
checkpoint (docs/cluster.md).
"""
from __future__ import annotations

import argparse
import os
import signal

import torch
import torch.distributed as dist

from core.runtime import Runtime
from tools.errors import UserError
from tools.run_files import RunFiles

# Exit codes of a run stopped by a signal after saving <tag>_last.pth: 128 + the signal's number, as a shell
# reports a process killed by it (docs/cluster.md). A scheduler may requeue on these; 2 is bad input, never
# worth a retry.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # USR1: SLURM's --signal=USR1@T warning
# Test-only fault injection (tests/test_distributed.py): "RANK:ITERATION" makes that rank SIGKILL itself as it
# starts that iteration, on torchrun's first attempt only, to exercise --max_restarts with --resume auto.
KILL_HOOK = "OASS_TEST_KILL_RANK_AT"


class StopRequest:
    """SIGINT/SIGTERM/SIGUSR1 ask the loop to save and exit at the end of the current iteration; the
    previous handlers come back when the loop ends (in-process callers, tests)."""

    def __init__(self, runtime: Runtime) -> None:
        self.signum = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        # under torchrun each rank gets the signal on its own, maybe an iteration apart: they agree through
        # a tiny CPU all-reduce (gloo: no wait on the GPU's queue)
        self.distributed = runtime.distributed
        self.group = None
        if self.distributed and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")

    def _handle(self, signum, frame) -> None:
        if self.signum:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self) -> int:
        """The signal to stop on now (0: none), the same on every rank."""
        if not self.distributed:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def fault_hook(rank: int, iteration: int) -> None:
    """KILL_HOOK's fault: a hard crash of one worker (no save, no cleanup), as an OOM kill or a lost node."""
    target = os.environ.get(KILL_HOOK)
    if target and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and target == f"{rank}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)


def resolve_resume(args: argparse.Namespace, files: RunFiles) -> tuple[bool, str]:
    """Whether the run continues <tag>_last.pth (--resume auto: when it exists), and the log line of a
    fresh start over earlier outputs ("" otherwise): a run killed before its first save left a log but
    nothing to continue. The config records the bool."""
    if args.resume != "auto":
        return args.resume, ""
    last, best = files.checkpoint("last"), files.checkpoint("best")
    if last.exists():
        return True, ""
    if best.exists():  # a checkpoint without its last: refuse rather than drop or guess
        raise UserError(f"--resume auto: {best} exists but {last} does not, so there is no state to continue; "
                        f"pass --overwrite to start --tag {args.tag} over, or choose another --tag")
    found = files.existing()
    if not found:
        return False, ""
    return False, (f"# --resume auto: no checkpoint of --tag {args.tag} to continue (a run stopped before its "
                   f"first save); started over, replacing {', '.join(str(p) for p in found)}")
