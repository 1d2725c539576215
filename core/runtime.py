"""Devices, processes and random state: what a run needs before it touches data or models."""
from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

from tools.checkpoint import plain_rng_states, raw_rng_states
from tools.errors import UserError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device(name: str) -> torch.device:
    """auto = CUDA when available, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def processor_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> str | None:
    """The repository's commit, with "+changes" when tracked files differ from it; None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        commit = git("rev-parse", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """What a bitwise rerun needs besides the config: the results of the same recipe differ across CPU
    kinds, GPU models, thread counts and library versions (docs/miniature.md, Reproducing)."""
    is_cuda = device.type == "cuda"
    return {"code": code_version(), "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if is_cuda else processor_name(),
            "cpu_threads": torch.get_num_threads(), "world_size": int(os.environ.get("WORLD_SIZE", "1"))}


def autocast_settings(device: torch.device, amp: str) -> dict:
    """torch.autocast keyword arguments for --amp off|bf16|fp16 on `device`."""
    dtype = AMP_DTYPES[amp]
    return {"device_type": device.type, "dtype": dtype, "enabled": dtype is not None}


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Pick the device; under torchrun, join the process group (NCCL on CUDA, gloo on CPU)."""
    device = choose_device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on the CPU")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device("cuda", local_rank)
    if args.batch_size % (world_size * args.accum_steps):
        raise UserError(
            f"--batch_size {args.batch_size} is not divisible by world size {world_size} x --accum_steps "
            f"{args.accum_steps}; pick a multiple of {world_size * args.accum_steps}"
        )
    micro, chunk = args.batch_size // (world_size * args.accum_steps), args.batch_size // args.reference_gpus
    if micro > chunk and micro % chunk:
        raise UserError(
            f"each process's micro-batch ({micro} images) must hold whole BatchNorm chunks of --batch_size / "
            f"--reference_gpus = {chunk} images; change --reference_gpus, --accum_steps or the number of processes"
        )
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # torchrun's restarts can leave the previous attempt's keys in the store they share, and a restarted gloo
        # group then waited on the dead workers' addresses (seen in tests/test_distributed.py's restart test):
        # every attempt gets keys of its own
        store, rank, world_size = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.PrefixStore(f"oass/attempt_{attempt}", store), rank=rank,
                                world_size=world_size)
    return Runtime(device, rank, world_size, local_rank)


# --num_workers auto: at most this many loader processes per training process. Each holds a copy of the
# dataset and its decoder buffers; past the count that feeds the step, more only cost memory.
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what taskset, SLURM or a container allow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(value: str | int) -> int:
    """DataLoader workers for --num_workers `value`: a number as given; auto = this process's share of the
    CPUs (torchrun's LOCAL_WORLD_SIZE processes share the node) minus one for the process itself, capped."""
    if value != "auto":
        return int(value)
    share = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_AUTO_WORKERS, share - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """Every generator's state in plain form (lists, ints, tensors): a checkpoint stays weights_only-loadable."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return plain_rng_states(states)


def set_rng_states(states: dict) -> None:
    """Restore the states that rng_states() returned."""
    raw = raw_rng_states(states)
    random.setstate(raw["python"])
    np.random.set_state(raw["numpy"])
    torch.set_rng_state(raw["torch"])
    if "cuda" in raw and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(raw["cuda"])


def wrap_for_devices(model: nn.Module, runtime: Runtime, trainable: bool) -> nn.Module:
    """DDP under torchrun (trainable models), DataParallel over several visible GPUs (the original's mode)."""
    if runtime.distributed and trainable:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if not runtime.distributed and runtime.device.type == "cuda" and torch.cuda.device_count() > 1:
        return nn.DataParallel(model)
    return model


def broadcast_buffers(model: nn.Module, runtime: Runtime) -> None:
    """Give every rank rank 0's BatchNorm statistics (those of the reference's first chunk), as DDP does at
    the start of its next forward; validation shards are scored by every rank, so they must agree first."""
    if runtime.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
