"""A fake SLURM for the tests: sbatch, srun, sacct, scontrol requeue and scancel, run on this machine.

    python fake_slurm.py install BIN_DIR      # BIN_DIR/{sbatch,srun,sacct,scontrol,scancel} call this file
    PATH=BIN_DIR:$PATH FAKE_SLURM_DIR=STATE ...

sbatch reads the script's #SBATCH --array=0-N%P, answers "Submitted batch job J" at once and leaves a runner
in the background that runs the array's tasks, P at a time, each as `bash SCRIPT` in a session of its own with
SLURM's variables (SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, ...), from the directory sbatch ran
in. Signals as SLURM sends them: `scancel --signal SIG J_T` to every process of the task but its batch shell;
`scancel J_T` SIGTERM to all of them, SIGKILL 2 s later, state CANCELLED. `scontrol requeue J_T` queues the
task again once its processes have ended. sacct -o JobID,State,... --parsable2 -j J prints each task's state
(PENDING, RUNNING, COMPLETED, FAILED, CANCELLED). State lives in $FAKE_SLURM_DIR, one JSON file per task.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

TOOLS = ("sbatch", "srun", "sacct", "scontrol", "scancel")
KILL_WAIT_S = 2.0


def state_dir() -> Path:
    folder = Path(os.environ.get("FAKE_SLURM_DIR", f"/tmp/fake_slurm_{os.getuid()}"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def task_file(job: str, task: int) -> Path:
    return state_dir() / job / f"{task}.json"


def read_task(job: str, task: int) -> dict:
    for _ in range(50):
        try:
            return json.loads(task_file(job, task).read_text())
        except (OSError, ValueError):
            time.sleep(0.01)
    return {}


def write_task(job: str, task: int, **fields) -> None:
    record = {**read_task(job, task), **fields} if task_file(job, task).exists() else fields
    tmp = task_file(job, task).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, task_file(job, task))


def split_id(job_id: str) -> tuple[str, list[int] | None]:
    job, _, task = job_id.partition("_")
    if task:
        return job, [int(task)]
    return job, None


def tasks_of(job_id: str) -> list[tuple[str, int]]:
    job, tasks = split_id(job_id)
    if tasks is None:
        tasks = sorted(int(p.stem) for p in (state_dir() / job).glob("*.json") if p.stem.isdigit())
    return [(job, t) for t in tasks]


# ----------------------------------------------------------------------------- sbatch and its runner
def sbatch(argv: list[str]) -> int:
    script = Path(argv[-1]).resolve()
    text = script.read_text()
    array = re.search(r"^#SBATCH --array=(\d+)-(\d+)(?:%(\d+))?", text, re.M)
    first, last, parallel = (int(array.group(1)), int(array.group(2)), int(array.group(3) or 1000)) if array \
        else (0, 0, 1)
    with open(state_dir() / "next_id", "a+") as counter:
        fcntl.flock(counter, fcntl.LOCK_EX)
        counter.seek(0)
        job = str(int(counter.read() or "1000") + 1)
        counter.seek(0)
        counter.truncate()
        counter.write(job)
    (state_dir() / job).mkdir()
    (state_dir() / job / "script.sh").write_text(text)  # as SLURM, keep the script as it was at submission
    script = state_dir() / job / "script.sh"
    for task in range(first, last + 1):
        write_task(job, task, state="PENDING", restarts=0)
    meta = {"script": str(script), "cwd": os.getcwd(), "array": bool(array), "parallel": parallel,
            "tasks": list(range(first, last + 1))}
    (state_dir() / job / "meta.json").write_text(json.dumps(meta))
    log = open(state_dir() / job / "runner.log", "ab")
    subprocess.Popen([sys.executable, __file__, "_run", job], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                     start_new_session=True)
    print(f"Submitted batch job {job}")
    return 0


def expand(path: str, env: dict) -> str:
    return (path.replace("%A", env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"]))
            .replace("%a", env.get("SLURM_ARRAY_TASK_ID", "0")).replace("%j", env["SLURM_JOB_ID"])
            .replace("%t", "0"))


def start_task(job: str, task: int, meta: dict) -> subprocess.Popen:
    env = {**os.environ, "SLURM_JOB_ID": f"{job}{task:03d}" if meta["array"] else job, "SLURM_NTASKS": "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_RESTART_COUNT": str(read_task(job, task).get("restarts", 0))}
    if meta["array"]:
        env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(task))
    text = Path(meta["script"]).read_text()
    output = re.search(r"^#SBATCH --output=(\S+)", text, re.M)
    out = open(expand(output.group(1), env), "ab") if output else subprocess.DEVNULL
    proc = subprocess.Popen(["bash", meta["script"]], cwd=meta["cwd"], env=env, stdout=out, stderr=out,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    write_task(job, task, state="RUNNING", shell=proc.pid, session=proc.pid)
    return proc


def run_array(job: str) -> int:
    meta = json.loads((state_dir() / job / "meta.json").read_text())
    running: dict[int, subprocess.Popen] = {}
    while True:
        for task, proc in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[task]
            # the job step may outlive its batch shell for a moment: wait for the session to empty
            deadline = time.time() + 30
            while session_pids(proc.pid) and time.time() < deadline:
                time.sleep(0.1)
            flags = state_dir() / job
            if (flags / f"{task}.requeue").exists() and not (flags / f"{task}.cancel").exists():
                (flags / f"{task}.requeue").unlink()
                write_task(job, task, state="PENDING", restarts=read_task(job, task).get("restarts", 0) + 1,
                           shell=None)
            elif (flags / f"{task}.cancel").exists():
                write_task(job, task, state="CANCELLED", exit=code, shell=None)
            else:
                write_task(job, task, state="COMPLETED" if code == 0 else "FAILED", exit=code, shell=None)
        pending = [t for t in meta["tasks"] if read_task(job, t).get("state") == "PENDING"]
        if (state_dir() / job / "cancel_all").exists():
            for task in pending:
                write_task(job, task, state="CANCELLED")
            pending = []
        while pending and len(running) < meta["parallel"]:
            task = pending.pop(0)
            running[task] = start_task(job, task, meta)
        if not running and not pending:
            return 0
        time.sleep(0.1)


# ----------------------------------------------------------------------------- srun
def srun(argv: list[str]) -> int:
    """srun [--unbuffered] [--output F] [--error F] [other --options] COMMAND...: COMMAND with its output there."""
    files, i = {}, 0
    while i < len(argv) and argv[i].startswith("-"):
        name, _, value = argv[i].partition("=")
        if name in ("--output", "--error", "-o", "-e"):
            if not value:
                i += 1
                value = argv[i]
            files[name.lstrip("-")[0]] = expand(value, os.environ)
        i += 1
    for fd, key in ((1, "o"), (2, "e")):
        if key in files:
            target = os.open(files[key], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(target, fd)
            os.close(target)
    os.execvp(argv[i], argv[i:])


# ----------------------------------------------------------------------------- signals
def session_pids(session: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def signal_task(job: str, task: int, signum: int, shell_too: bool) -> None:
    record = read_task(job, task)
    if record.get("state") != "RUNNING" or not record.get("session"):
        return
    for pid in session_pids(record["session"]):
        if shell_too or pid != record.get("shell"):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def signal_number(name: str) -> int:
    name = name.upper()
    if name.isdigit():
        return int(name)
    return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))


def scancel(argv: list[str]) -> int:
    signum, ids, i = None, [], 0
    while i < len(argv):
        word = argv[i]
        if word in ("--signal", "-s"):
            i += 1
            signum = signal_number(argv[i])
        elif word.startswith("--signal="):
            signum = signal_number(word.split("=", 1)[1])
        elif not word.startswith("-"):
            ids.append(word)
        i += 1
    for job_id in ids:
        job, tasks = split_id(job_id)
        if signum is None and tasks is None:
            (state_dir() / job / "cancel_all").touch()
        for job, task in tasks_of(job_id):
            if signum is not None:
                signal_task(job, task, signum, shell_too=False)
                continue
            (state_dir() / job / f"{task}.cancel").touch()
            if read_task(job, task).get("state") == "PENDING":
                write_task(job, task, state="CANCELLED")
                continue
            signal_task(job, task, signal.SIGTERM, shell_too=True)
            time.sleep(KILL_WAIT_S)
            signal_task(job, task, signal.SIGKILL, shell_too=True)
    return 0


def scontrol(argv: list[str]) -> int:
    if not argv or argv[0] != "requeue":
        print(f"fake scontrol: only 'requeue' is known, not {argv}", file=sys.stderr)
        return 1
    for job_id in argv[1:]:
        for job, task in tasks_of(job_id):
            (state_dir() / job / f"{task}.requeue").touch()
    return 0


# ----------------------------------------------------------------------------- sacct
def sacct(argv: list[str]) -> int:
    fields, ids, i = ["JobID", "State"], [], 0
    while i < len(argv):
        word = argv[i]
        if word in ("-o", "--format"):
            i += 1
            fields = argv[i].split(",")
        elif word.startswith("--format="):
            fields = word.split("=", 1)[1].split(",")
        elif word in ("-j", "--jobs"):
            i += 1
            ids.extend(argv[i].split(","))
        i += 1
    print("|".join(fields))
    for job_id in ids:
        for job, task in tasks_of(job_id):
            record = read_task(job, task)
            if not record:
                continue
            array = json.loads((state_dir() / job / "meta.json").read_text())["array"]
            values = {"JobID": f"{job}_{task}" if array else job, "State": record["state"],
                      "NodeList": "localhost", "ExitCode": f"{record.get('exit', 0)}:0"}
            print("|".join(values.get(f, "") for f in fields))
    return 0


def install(folder: str) -> int:
    bin_dir = Path(folder)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        path = bin_dir / tool
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {tool} "$@"\n')
        path.chmod(0o755)
    return 0


def main() -> int:
    command, argv = sys.argv[1], sys.argv[2:]
    if command == "install":
        return install(argv[0])
    if command == "_run":
        return run_array(argv[0])
    return {"sbatch": sbatch, "srun": srun, "sacct": sacct, "scontrol": scontrol, "scancel": scancel}[command](argv)


if __name__ == "__main__":
    sys.exit(main())
