"""One run of a sweep as a submitit job (--launcher slurm): the run's training command in a child process,
requeued through submitit's checkpointing when SLURM warns of a preemption or of the time limit.

tools/sweep_slurm.py pickles this module by value into every job, so that a job needs neither this repository
on its Python path nor its imports: only the standard library and submitit here.

Signals (docs/cluster.md#sweeps-on-slurm). SLURM signals every process of a job. submitit's warning signal
(USR2 unless $SUBMITIT_PREEMPT_SIGNAL says otherwise; `#SBATCH --signal=USR2@90`) is ignored by the run, and
submitit calls `checkpoint` on it: the run is asked once, with SIGUSR1, to save at the end of its iteration
(exit 138), then submitit requeues the job, which runs the same command again with --resume auto. A SIGTERM
(preemption, scancel) reaches the run directly: it saves and exits 143, and this job asks nothing more of it,
since a second signal would make it stop without saving.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import submitit

RUN_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # the run saves on these (core/preemption.py)
GRACE_S = 30  # after the run stopped on a signal: how long to wait for submitit's requeue or SLURM's kill


class RunFailed(RuntimeError):
    """The training command ended without finishing; the message carries its exit code."""


class SweepRun(submitit.helpers.Checkpointable):
    def __init__(self, command: list[str], cwd: str, env: dict[str, str], tag: str, log: str) -> None:
        self.command, self.cwd, self.env, self.tag, self.log = command, cwd, env, tag, log
        self._proc: subprocess.Popen | None = None
        self._warning = 0  # submitit's warning signal
        self._signalled = 0  # a stop signal of the run that reached this job, so the run too

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._proc, self._warning, self._signalled = None, 0, 0

    def _note_signal(self, signum: int, previous) -> None:
        self._signalled = signum
        if callable(previous):
            previous(signum, None)

    def __call__(self) -> str:
        self._warning = submitit.JobEnvironment._usr_sig()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            signal.signal(sig, lambda signum, frame, previous=previous: self._note_signal(signum, previous))
        # the run ignores submitit's warning (an ignored signal stays ignored across exec), unless the warning is
        # one of its own stop signals: then it saves on it by itself
        ignore = self._warning not in RUN_STOP_SIGNALS
        handler = signal.signal(self._warning, signal.SIG_IGN) if ignore else None
        try:
            self._proc = subprocess.Popen(self.command, cwd=self.cwd, env={**os.environ, **self.env})
        finally:
            if ignore:
                signal.signal(self._warning, handler)
        code = self._wait()
        if code == 0:
            return f"{self.tag}: finished"
        if code - 128 in RUN_STOP_SIGNALS or -code in RUN_STOP_SIGNALS:
            # saved and stopped on a signal: submitit's warning (requeue) or SLURM's kill is on its way
            deadline = time.time() + GRACE_S
            while time.time() < deadline:
                time.sleep(0.5)
        raise RunFailed(f"{self.tag}: the training command ended with exit code {code}; its log: {self.log}")

    def _wait(self) -> int:
        # poll rather than Popen.wait: checkpoint() runs in a signal handler that may interrupt this loop, and
        # Popen.wait holds a lock while it waits; checkpoint() itself waits without reaping (_exited)
        while (code := self._proc.poll()) is None:
            time.sleep(0.5)
        return code

    def _exited(self) -> bool:
        """Whether the run has ended, without reaping it (and without Popen's lock, see _wait)."""
        if self._proc.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped meanwhile
            return True

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit's warning signal: the run saves and stops, then submitit requeues this job unchanged."""
        if self._proc is not None:
            if not self._exited() and not self._signalled and self._warning not in RUN_STOP_SIGNALS:
                self._proc.send_signal(signal.SIGUSR1)
            while not self._exited():
                time.sleep(0.5)
        return submitit.helpers.DelayedSubmission(type(self)(self.command, self.cwd, self.env, self.tag, self.log))
