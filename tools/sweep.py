"""run_experiments.py's launching, apart from its planning: the sweep folder with one record per run, several
local runs at once on devices of their own, and the status listing (docs/cluster.md#sweeps).

A sweep is the runs of one --prefix in one --output_dir; its folder is <output_dir>/sweeps/<prefix>/. Each run
has a record there, <tag>.json, written by the launcher that started it: where it runs (a process id or a
SLURM job id), on what (GPUs, CPUs, threads), how it ended and why, and the paths of its outputs.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tools.errors import UserError
from tools.files import atomic_write
from tools.run_files import RunFiles

# a run stopped by one of these saves its last checkpoint and exits 128 + the signal's number (docs/cluster.md)
RUN_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@dataclass
class PlannedRun:
    script: Path
    seed: int
    tag: str
    argv: list[str]  # the training flags of this run, without --resume / --overwrite
    state: str  # new | finished | resume (a last checkpoint exists)
    output_dir: Path

    def command(self) -> list[str]:
        return [sys.executable, str(self.script), *self.argv, "--resume", "auto"]

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.output_dir, self.tag)

    def head(self, number: int, total: int) -> str:
        return f"[{number}/{total}] {self.tag} ({self.script.name}, seed {self.seed})"


def sweep_folder(runs: list[PlannedRun]) -> Path:
    """<output_dir>/sweeps/<prefix>: the runs of one command share their prefix and output folder."""
    return runs[0].output_dir / "sweeps" / runs[0].tag.split("@")[0]


def best_map(run: PlannedRun) -> str:
    try:
        history = json.loads(run.files.history.read_text())
        return f"best val mAP {max(r['mAP'] for r in history['validation']):.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        return "no validation recorded"


class Records:
    """One JSON record per run in the sweep folder, rewritten whole (temp file and rename) at each change."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, tag: str) -> Path:
        return self.folder / f"{tag}.json"

    def read(self, tag: str) -> dict:
        try:
            record = json.loads(self.path(tag).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def write(self, tag: str, **fields) -> dict:
        record = {**self.read(tag), **fields}
        text = json.dumps(record, indent=1, default=str).encode()
        atomic_write(self.path(tag), lambda f: f.write(text), "use an --output_dir you can write to", durable=False)
        return record


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# ----------------------------------------------------------------------------- why a run ended
def last_error_line(console: Path | None) -> str:
    """The run's `error:` line (bad input), else its last line, from the end of its console output."""
    if console is None:
        return ""
    try:
        with open(console, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.split("\r")[-1].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


def describe_exit(code: int, console: Path | None = None) -> str:
    """Why a training process ended with `code` (Popen's: -N when signal N killed it), in a few words."""
    if code == 0:
        return "finished"
    caught = code - 128 if code > 128 else 0
    killed = -code if code < 0 else 0
    if caught in RUN_STOP_SIGNALS:
        return (f"stopped by {signal.Signals(caught).name} (exit {code}) after saving its last checkpoint; "
                "rerunning the sweep resumes it")
    if killed or code == 137:
        name = signal.Signals(killed or 9).name
        return (f"killed by {name} (exit {code}), nothing saved at that moment; rerunning the sweep resumes it "
                "from its last save")
    line = last_error_line(console)
    kind = "bad input" if code == 2 else "crashed"
    return f"{kind} (exit {code})" + (f": {line}" if line else "")


# ----------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class Slot:
    """What one of the runs at once may use; empty fields leave the machine's default."""

    gpus: tuple[int, ...] = ()  # CUDA indices as this process sees them
    cpus: tuple[int, ...] = ()  # CPU affinity
    threads: int | None = None  # OMP_NUM_THREADS: torch's intra-op threads

    def env(self) -> dict[str, str]:
        env = {}
        if self.gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            names = visible.split(",") if visible else None
            env["CUDA_VISIBLE_DEVICES"] = ",".join(names[i] if names else str(i) for i in self.gpus)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    def describe(self) -> str:
        parts = []
        if self.gpus:
            parts.append(("GPU " if len(self.gpus) == 1 else "GPUs ") + ",".join(map(str, self.gpus)))
        if self.cpus:
            parts.append(f"CPU{'s' if len(self.cpus) > 1 else ''} {cpu_ranges(self.cpus)}")
        if self.threads:
            parts.append(f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        return ", ".join(parts) or "the whole machine"


def cpu_ranges(cpus: tuple[int, ...]) -> str:
    """0,1,2,5 -> 0-2,5"""
    spans: list[list[int]] = []
    for cpu in cpus:
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def parse_gpus(text: str) -> list[int]:
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--gpus {text}: give CUDA device indices separated by commas, e.g. --gpus 0,1,2,3") from None
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise UserError(f"--gpus {text}: each index once, 0 or more (e.g. --gpus 0,1,2,3)")
    return indices


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_slots(parallel: int | None, gpus: str | None, gpus_per_run: int | None, threads: int | None,
                device: str) -> list[Slot]:
    """The devices of each of the runs at once: one --gpus_per_run group of GPUs each (--gpus, or every visible
    GPU when several runs share a CUDA machine), an equal share of this process's CPUs, and as many threads."""
    if parallel is not None and parallel < 1:
        raise UserError(f"--parallel {parallel}: runs at once must be 1 or more (1 runs them one after another)")
    if threads is not None and threads < 1:
        raise UserError(f"--threads_per_run {threads}: give 1 or more threads")
    if gpus_per_run is not None and gpus_per_run < 1:
        raise UserError(f"--gpus_per_run {gpus_per_run}: give 1 or more (leave out --gpus to run on the CPU)")
    count = cuda_device_count()
    if gpus is not None:
        indices = parse_gpus(gpus)
        if device == "cpu":
            raise UserError("--gpus with --device cpu: leave out one of them")
        if count == 0:
            raise UserError(f"--gpus {gpus}: there is no CUDA device here (torch.cuda.is_available() is False); "
                            "leave out --gpus to run on the CPU")
        missing = [i for i in indices if i >= count]
        if missing:
            raise UserError(f"--gpus {gpus}: there is no GPU {missing[0]} here; CUDA sees {count} "
                            f"(0-{count - 1})")
    elif count and device != "cpu" and ((parallel or 1) > 1 or gpus_per_run):
        indices = list(range(count))
    elif gpus_per_run:
        why = "with --device cpu" if count else "there is no CUDA device here"
        raise UserError(f"--gpus_per_run {gpus_per_run}: {why}; leave it out to run on the CPU")
    else:
        indices = []
    if indices and device.startswith("cuda:"):
        raise UserError(f"--device {device} with GPUs given to each run: leave out --device (each run sees only "
                        "its own GPUs)")
    groups: list[tuple[int, ...]] = []
    if indices:
        size = gpus_per_run or 1
        groups = [tuple(indices[i:i + size]) for i in range(0, len(indices) - size + 1, size)]
        where = f"--gpus names {len(indices)}" if gpus is not None else f"this machine has {len(indices)}"
        if not groups or (parallel or len(groups)) > len(groups):
            wanted = parallel or 1
            raise UserError(f"--parallel {wanted} with --gpus_per_run {size} needs {wanted * size} GPUs; {where}")
        parallel = parallel or len(groups)
    parallel = parallel or 1
    if parallel == 1:
        return [Slot(gpus=groups[0] if groups else (), threads=threads)]
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // parallel
    slots = []
    for i in range(parallel):
        mine = tuple(cpus[i * share:(i + 1) * share]) if share else ()
        slots.append(Slot(gpus=groups[i] if groups else (), cpus=mine, threads=threads or max(1, share)))
    return slots


# ----------------------------------------------------------------------------- several local runs
@dataclass
class Running:
    number: int
    run: PlannedRun
    slot: int
    proc: subprocess.Popen
    began: float
    console: Path | None


class LocalSweep:
    """Runs the planned runs on this machine, len(slots) at a time, each in a session of its own with its slot's
    devices. Output: inline with one slot (the runs one after another), else into <sweep>/<tag>.out. SIGINT and
    SIGTERM reach each running run once (it saves and exits 128 + signum) and start nothing new."""

    def __init__(self, runs: list[PlannedRun], slots: list[Slot], folder: Path) -> None:
        self.runs, self.slots, self.folder = runs, slots, folder
        self.records = Records(folder)
        self.inline = len(slots) == 1
        self.running: dict[int, Running] = {}
        self.stopping = 0
        self.outcomes: dict[str, tuple[str, str]] = {}  # tag -> (finished | skipped | failed, why)

    def _on_signal(self, signum, frame) -> None:
        self.stopping = signum
        for job in list(self.running.values()):
            if job.proc.poll() is None:
                job.proc.send_signal(signum)

    def start(self, number: int, run: PlannedRun, slot_index: int) -> Running:
        slot = self.slots[slot_index]
        console = None if self.inline else self.folder / f"{run.tag}.out"
        out = None
        if console is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            out = open(console, "ab")
            out.write(f"\n# {now()}: {' '.join(run.command())}\n".encode())
            out.flush()
        try:
            proc = subprocess.Popen(run.command(), cwd=Path(__file__).resolve().parents[1], env={**os.environ,
                                    **slot.env()}, stdout=out, stderr=subprocess.STDOUT if out else None,
                                    start_new_session=True)
        finally:
            if out is not None:
                out.close()
        if slot.cpus:
            try:
                os.sched_setaffinity(proc.pid, slot.cpus)
            except OSError:  # the run exited already; its exit code tells why
                pass
        self.records.write(run.tag, launcher="local", state="running", pid=proc.pid, host=socket.gethostname(),
                           started=now(), command=shlex.join(run.command()), env=slot.env(), devices=slot.describe(),
                           console=str(console) if console else None, log=str(run.files.log), exit_code=None,
                           reason=None)
        return Running(number, run, slot_index, proc, time.time(), console)

    def finish(self, job: Running, code: int) -> str:
        """Record and report how `job` ended; returns its reason ("finished" when it did)."""
        reason = describe_exit(code, job.console)
        state = "finished" if code == 0 else "failed"
        self.records.write(job.run.tag, state=state, exit_code=code, reason=reason, ended=now())
        self.outcomes[job.run.tag] = (state, reason)
        return reason

    def run(self, on_failure=None) -> float:
        """Run every planned run; `on_failure(job, reason)` may raise to stop at the first failure (the
        sequential launcher). Returns the seconds taken."""
        total, start = len(self.runs), time.time()
        queue = []
        for number, run in enumerate(self.runs, 1):
            record = self.records.read(run.tag)
            if run.state == "finished":
                print(f"{run.head(number, total)}: finished earlier, skipped; {best_map(run)}", flush=True)
                self.outcomes[run.tag] = ("skipped", "finished earlier")
            elif record.get("launcher") == "local" and local_status(run, record)[0] == "running":
                print(f"{run.head(number, total)}: already running (pid {record['pid']} on {record['host']}), left "
                      "alone", flush=True)
                self.outcomes[run.tag] = ("skipped", f"already running as pid {record['pid']}")
            else:
                queue.append((number, run))
                self.records.write(run.tag, launcher="local", state="queued", launcher_pid=os.getpid(),
                                   host=socket.gethostname(), queued=now(), log=str(run.files.log), pid=None)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while queue or self.running:
                free = [i for i in range(len(self.slots)) if i not in self.running]
                while free and queue and not self.stopping:
                    number, run = queue.pop(0)
                    job = self.start(number, run, free.pop(0))
                    self.running[job.slot] = job
                    word = "resuming from its last checkpoint" if run.state == "resume" else "starting"
                    where = "" if self.inline else f" on {self.slots[job.slot].describe()}; its output: {job.console}"
                    print(f"{run.head(number, total)}: {word}{where} (total {time.time() - start:.0f} s so far)",
                          flush=True)
                if self.stopping and queue:
                    queue.clear()
                if not self.running:
                    break
                time.sleep(0.2)
                for slot_index, job in list(self.running.items()):
                    code = job.proc.poll()
                    if code is None:
                        continue
                    del self.running[slot_index]
                    reason = self.finish(job, code)
                    head = f"[{job.number}/{total}] {job.run.tag}"
                    if code == 0:
                        print(f"{head}: done in {time.time() - job.began:.0f} s; {best_map(job.run)}", flush=True)
                    else:
                        where = f"; its output: {job.console}" if job.console else ""
                        print(f"{head}: failed after {time.time() - job.began:.0f} s: {reason}{where}", flush=True)
                        if on_failure is not None:
                            on_failure(job, reason)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return time.time() - start

    def summary(self, seconds: float) -> list[str]:
        counts = {word: sum(state == word for state, _ in self.outcomes.values())
                  for word in ("finished", "skipped", "failed")}
        lines = [f"# {len(self.runs)} runs in {seconds:.0f} s: {counts['finished']} finished, {counts['skipped']} "
                 f"skipped, {counts['failed']} failed" + (f", {len(self.runs) - len(self.outcomes)} not started"
                                                         if len(self.outcomes) < len(self.runs) else "")]
        for run in self.runs:
            state, reason = self.outcomes.get(run.tag, ("", ""))
            if state == "failed":
                lines.append(f"#   failed: {run.tag}: {reason} (its log: {run.files.log})")
        if self.stopping:
            lines.append(f"# stopped by {signal.Signals(self.stopping).name}: rerun this command to resume; "
                         "finished runs are skipped")
        return lines


# ----------------------------------------------------------------------------- status
def process_alive(pid: int | None, host: str | None, tag: str) -> bool:
    """Whether `pid` on this host is still the run of `tag` (a reused pid runs something else)."""
    if not pid:
        return False
    if host != socket.gethostname():  # another machine's process, which this one cannot see
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return tag.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def local_status(run: PlannedRun, record: dict) -> tuple[str, str]:
    """(state, detail) of a run that the local launcher knows and that has not finished."""
    state = record.get("state")
    if state == "running":
        if process_alive(record.get("pid"), record.get("host"), run.tag):
            return "running", f"pid {record['pid']} on {record.get('host')}, {record.get('devices')}"
        return "failed", "its process is gone (killed, or the machine restarted); rerunning the sweep resumes it"
    if state == "queued":
        if process_alive(record.get("launcher_pid"), record.get("host"), "run_experiments"):
            return "queued", f"waits for a free slot of run_experiments.py (pid {record.get('launcher_pid')})"
        return "not started", "its sweep stopped before starting it"
    if state == "failed":
        return "failed", record.get("reason") or f"exit {record.get('exit_code')}"
    if state == "finished":  # an earlier command's end, before this command's --max_iterations
        return "not started", "finished an earlier command's iterations; rerunning the sweep continues it"
    return unrecorded_status(run)


def unrecorded_status(run: PlannedRun) -> tuple[str, str]:
    if run.state == "resume":
        return "failed", "stopped before its end (no record of why); rerunning the sweep resumes it"
    if run.files.existing():
        return "failed", "stopped before its first checkpoint; rerunning the sweep starts it over"
    return "not started", ""


STATES = ("finished", "running", "queued", "failed", "unknown", "not started")


def status_lines(runs: list[PlannedRun], folder: Path, slurm=None) -> list[str]:
    """One line per run: its state (STATES), its log, why, and its console or job output; then the counts.
    `slurm` is tools.sweep_slurm (for --launcher slurm) or None."""
    records = Records(folder)
    known = {run.tag: records.read(run.tag) for run in runs}
    job_ids = [r["job_id"] for r in known.values() if r.get("launcher") == "slurm" and r.get("job_id")]
    states = slurm.job_states(job_ids) if job_ids and slurm is not None else {}
    rows = []
    for run in runs:
        record = known[run.tag]
        if run.state == "finished":
            state, detail = "finished", best_map(run)
        elif record.get("launcher") == "slurm":
            state, detail = (slurm.slurm_status(record, states.get(record["job_id"], "UNKNOWN")) if slurm is not None
                             else ("unknown", f"job {record.get('job_id')}: ask with --launcher slurm --status"))
        elif record.get("launcher") == "local":
            state, detail = local_status(run, record)
        else:
            state, detail = unrecorded_status(run)
        output = record.get("stdout") or record.get("console")
        if output and state != "finished":
            detail += f"{'; ' if detail else ''}its output: {output}"
        rows.append((run.tag, state, run.files.log, detail))
    width = max(len(tag) for tag, *_ in rows)
    lines = [f"{tag:<{width}}  {state:<11}  log {log}" + (f"  ({detail})" if detail else "")
             for tag, state, log, detail in rows]
    counts = ", ".join(f"{sum(row[1] == word for row in rows)} {word}" for word in STATES
                       if word in ("finished", "running", "queued", "failed") or any(row[1] == word for row in rows))
    return [*lines, f"# {len(rows)} runs: {counts}; sweep folder {folder}"]
