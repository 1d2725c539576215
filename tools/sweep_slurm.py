"""--launcher slurm: the sweep's runs as one submitit job array, and their jobs' states from sacct.

Imported only for --launcher slurm (run_experiments.py checks first that submitit is installed). Each array
task runs tools/slurm_job.SweepRun: the same command line as the local launcher, with --resume auto, requeued
by submitit on a preemption or time-limit warning (docs/cluster.md#sweeps-on-slurm).
"""
from __future__ import annotations

import logging
import pickle
import re
import shlex
import shutil
import socket
from pathlib import Path

import cloudpickle
import submitit
from submitit.core.utils import JobPaths
from submitit.slurm.slurm import SlurmInfoWatcher, _make_sbatch_string

from tools import slurm_job
from tools.errors import UserError
from tools.sweep import PlannedRun, Records, describe_exit, local_status, now

REPO = Path(__file__).resolve().parents[1]
MAX_TIMEOUT_REQUEUES = 20  # submitit stops requeueing a job after this many time limits (preemptions: no limit)
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING"}
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED"}


def sbatch_parameters(args, name: str) -> dict:
    """The array's SlurmExecutor parameters (sbatch's names, underscores for dashes)."""
    params = {"job_name": name, "time": args.timeout_min, "nodes": 1, "ntasks_per_node": 1}
    gpus = 1 if args.gpus_per_run is None else args.gpus_per_run
    if gpus:
        params["gpus_per_node"] = gpus
    for key, value in (("cpus_per_task", args.cpus_per_run), ("partition", args.partition),
                       ("account", args.account), ("array_parallelism", args.array_parallelism)):
        if value is not None:
            params[key] = value
    if args.slurm_extra:
        params["additional_parameters"] = dict(args.slurm_extra)
    return params


def sbatch_lines(params: dict, folder: Path, count: int) -> list[str]:
    """The #SBATCH lines of the script submitit writes for an array of `count` runs."""
    script = _make_sbatch_string(command="true", folder=folder, map_count=count if count > 1 else None, **params)
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def require_cluster() -> None:
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"--launcher slurm: no {missing[0]} on PATH, so this is not a SLURM login node; run the "
                        "sweep here with --launcher local, or --dry_run to see the job array")


def job_states(job_ids: list[str]) -> dict[str, str]:
    """sacct's state of each job id ("123_4" for an array task); UNKNOWN where sacct has none."""
    watcher = SlurmInfoWatcher(delay_s=0)
    for job_id in job_ids:
        watcher.register_job(job_id)
    logger = logging.getLogger("submitit")
    level = logger.level
    logger.setLevel(logging.ERROR)  # a failed sacct call shows as UNKNOWN states, not as submitit's warnings
    try:
        watcher.update()
    finally:
        logger.setLevel(level)
    return {job_id: watcher.get_state(job_id, mode="cache") for job_id in job_ids}


def job_paths(folder: Path, job_id: str) -> JobPaths:
    return JobPaths(folder, job_id=job_id, task_id=0)


def job_error(record: dict) -> str:
    """Why a job failed, from the error that submitit pickled for it (an exit code is described)."""
    try:
        with open(job_paths(Path(record["folder"]), record["job_id"]).result_pickle, "rb") as f:
            outcome, detail = pickle.load(f)
    except (OSError, KeyError, ValueError, TypeError, EOFError, pickle.UnpicklingError):
        return ""
    if outcome != "error":
        return ""
    last = [line for line in str(detail).splitlines() if line.strip()][-1:]
    code = re.search(r"exit code (-?\d+)", last[0]) if last else None
    if code:
        return describe_exit(int(code.group(1)), Path(record.get("stderr", "")) if record.get("stderr") else None)
    return last[0].strip()[:300] if last else ""


def slurm_status(record: dict, state: str) -> tuple[str, str]:
    """(state, detail) of an unfinished run from its job's sacct state."""
    job = f"job {record.get('job_id')}"
    base = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 123"
    if base in RUNNING:
        return "running", job
    if base in QUEUED:
        return "queued", f"{job} ({base})"
    if base == "UNKNOWN":
        why = "no sacct on PATH" if shutil.which("sacct") is None else "sacct knows no state for it"
        return "unknown", f"{job}: {why}"
    why = job_error(record)
    return "failed", f"{job} {base}" + (f": {why}" if why else "")


def active(record: dict, states: dict[str, str]) -> bool:
    state = states.get(record.get("job_id", ""), "UNKNOWN").split()[0]
    return state in RUNNING or state in QUEUED


def submit(runs: list[PlannedRun], params: dict, folder: Path, env: dict[str, str]) -> list[str]:
    """One job array (one job for a single run); returns the job ids, in the order of `runs`."""
    cloudpickle.register_pickle_by_value(slurm_job)  # the jobs need not import this repository
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES)
        executor.update_parameters(**{f"slurm_{key}": value for key, value in params.items()})
        jobs = executor.submit_array([slurm_job.SweepRun(run.command(), str(REPO), env, run.tag, str(run.files.log))
                                      for run in runs])
    except (RuntimeError, ValueError, OSError) as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise UserError(f"--launcher slurm: the submission failed: {lines[-1] if lines else type(exc).__name__}; "
                        "nothing was submitted") from None
    return [job.job_id for job in jobs]


def launch(runs: list[PlannedRun], args, folder: Path, status_hint: str) -> None:
    """Submit every run that is neither finished nor queued or running already; --dry_run prints instead."""
    records = Records(folder)
    env = {"OMP_NUM_THREADS": str(args.threads_per_run)} if args.threads_per_run else {}
    params = sbatch_parameters(args, f"oass-{runs[0].tag.split('@')[0]}")
    known = {run.tag: records.read(run.tag) for run in runs}
    slurm_records = [r for r in known.values() if r.get("launcher") == "slurm" and r.get("job_id")]
    states = job_states([r["job_id"] for r in slurm_records]) if slurm_records else {}
    todo, total = [], len(runs)
    lines = []
    for number, run in enumerate(runs, 1):
        record = known[run.tag]
        if run.state == "finished":
            lines.append(f"# {run.head(number, total)}: finished, skipped")
        elif record.get("launcher") == "slurm" and active(record, states):
            lines.append(f"# {run.head(number, total)}: already {states[record['job_id']].lower()} as job "
                         f"{record['job_id']}, left alone")
        elif record.get("launcher") == "local" and local_status(run, record)[0] == "running":
            lines.append(f"# {run.head(number, total)}: running on this machine (pid {record['pid']}), left alone")
        else:
            todo.append((number, run))
    if args.dry_run:
        for line in lines:
            print(line)
        if not todo:
            print("# nothing to submit")
            return
        print(f"# --launcher slurm: {len(todo)} run{'s' if len(todo) > 1 else ''} in one job array, partition "
              f"{args.partition or '(the cluster default)'}; its sbatch parameters (submitit's script, logs in "
              f"{folder}):")
        for line in sbatch_lines(params, folder, len(todo)):
            print(line)
        if env:
            print(f"# each job's environment adds: {' '.join(f'{k}={v}' for k, v in env.items())}")
        for index, (number, run) in enumerate(todo):
            print(f"# array task {index}: {run.head(number, total)}")
            print(shlex.join(run.command()))
        return
    if todo:
        require_cluster()
    for line in lines:
        print(line.removeprefix("# "), flush=True)
    if not todo:
        print("# nothing to submit: every run is finished, queued or running", flush=True)
        return
    job_ids = submit([run for _, run in todo], params, folder, env)
    for job_id, (number, run) in zip(job_ids, todo):
        paths = job_paths(folder, job_id)
        records.write(run.tag, launcher="slurm", state="submitted", job_id=job_id, folder=str(folder),
                      submitted=now(), host=socket.gethostname(), command=run.command(), env=env,
                      sbatch=params, log=str(run.files.log), stdout=str(paths.stdout), stderr=str(paths.stderr),
                      pid=None, exit_code=None, reason=None)
        word = "resumes from its last checkpoint" if run.state == "resume" else "starts"
        print(f"{run.head(number, total)}: submitted as job {job_id} ({word}); its output: {paths.stdout}", flush=True)
    array = job_ids[0].split("_")[0]
    print(f"# submitted job array {array} ({len(job_ids)} run{'s' if len(job_ids) > 1 else ''}) to partition "
          f"{args.partition or '(the cluster default)'}; logs in {folder}; follow it with: {status_hint}", flush=True)
