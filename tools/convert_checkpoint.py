"""Convert a checkpoint you trust into the plain form that every tool of this repo loads safely.

    python tools/convert_checkpoint.py OLD NEW [--overwrite]

The trainer, evaluate_classification.py, infer.py and visualize_cams.py load checkpoints with
torch.load(weights_only=True): tensors and plain values only, so that a shared .pth cannot run code.
Checkpoints written before that rule hold numpy RNG states (pickled numpy objects) and are refused.
This command TRUSTS OLD: it loads it with weights_only=False (which runs whatever code its pickle
carries, and says so on stderr), turns the RNG states, config and history into plain values, checks
that the result loads with weights_only=True and writes it atomically to NEW. OLD is left as it is
(unless NEW is OLD and --overwrite is given).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/convert_checkpoint.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tools.checkpoint import (  # noqa: E402
    load_checkpoint,
    plain_rng_states,
    plain_values,
    save_checkpoint,
)
from tools.errors import UserError, run_cli  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", metavar="OLD", help="the checkpoint to convert (it is trusted: its pickle code runs)")
    p.add_argument("new", metavar="NEW", help="where to write the converted checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace NEW if it exists (NEW may then be OLD)")
    return p


def load_trusted(path: Path) -> object:
    """OLD's contents: safely when it allows it, else by running its pickle (said on stderr)."""
    try:
        return load_checkpoint(path)
    except UserError as exc:
        if "needs arbitrary code" not in str(exc):
            raise
    print(f"warning: loading {path} with weights_only=False ran the code its pickle carries, because you "
          "asked to convert it; do this only with files you trust", file=sys.stderr, flush=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"{path} cannot be loaded even trusting it ({type(exc).__name__}: {exc})") from None


def convert(state: object) -> dict:
    """The checkpoint with plain RNG states, config and history (tensors stay tensors)."""
    if not isinstance(state, dict):
        raise UserError(f"not a checkpoint of the training scripts (a {type(state).__name__}, not a dict)")
    state = dict(state)
    if isinstance(state.get("config"), argparse.Namespace):
        state["config"] = vars(state["config"])
    if state.get("rng") is not None:
        state["rng"] = plain_rng_states(state["rng"])
    try:
        return plain_values(state)
    except TypeError as exc:
        raise UserError(f"it holds a value with no plain form ({exc})") from None


def check_loads_safely(state: dict) -> None:
    """Round-trip through memory: NEW is only written if weights_only=True can read it back."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"the converted checkpoint would still not load safely ({detail})") from None


def convert_file(args: argparse.Namespace) -> str:
    old, new = Path(args.old), Path(args.new)
    if new.exists() and not args.overwrite:
        raise UserError(f"{new} exists; choose another NEW, or pass --overwrite to replace it")
    try:
        state = convert(load_trusted(old))
        check_loads_safely(state)
    except UserError as exc:
        raise UserError(f"cannot convert {old}: {exc}") from None
    sha = save_checkpoint(state, new)
    print(f"wrote {new} (sha256 {sha}); it loads with torch.load(weights_only=True)")
    return sha


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: convert_file(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
