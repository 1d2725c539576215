"""Check a dataset before training: read every split file, decode every image once, list every problem.

    python tools/check_dataset.py --data_dir DIR [--dataset voc2012|voc2007|coco2014|list]
        [--split NAME [NAME ...]] [--keep_unlabelled] [--workers N]

Reports, in one list: missing image files, truncated or undecodable images, unknown classes, malformed
annotation or list lines, images without labels, and splits that cannot be read at all. Exit code 0
when clean; 2 with the list on stdout and one summary line `error: ...` on stderr otherwise.
Default splits: the dataset's training and validation splits.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python tools/check_dataset.py` from any folder
    sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from tools.datasets import DATASET_KINDS, default_splits, open_dataset, resolve_dataset  # noqa: E402
from tools.errors import UserError, fail, run_cli  # noqa: E402
from tools.images import BadImageError, load_rgb_image  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="the dataset folder, as given to the training scripts")
    p.add_argument("--dataset", default=None, choices=DATASET_KINDS, help="default: detected from the layout")
    p.add_argument("--split", nargs="+", default=None, help="splits to check (default: the dataset's train and val)")
    p.add_argument("--keep_unlabelled", action="store_true", help="COCO: also check the images without annotations")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding threads")
    return p


def decode_problem(path: Path) -> str | None:
    """None when the image decodes completely, else the one-line reason."""
    try:
        load_rgb_image(path)
    except BadImageError as exc:
        return str(exc).split("; re-download")[0]  # the fix is the same for every image: said once below
    return None


def check_split(kind: str, root: Path, split: str, keep_unlabelled: bool, workers: int) -> tuple[int, list[str]]:
    """(images checked, problems) of one split; a split that cannot be read at all is one problem."""
    problems: list[str] = []
    try:
        data = open_dataset(kind, root, split, keep_unlabelled=keep_unlabelled, problems=problems)
    except UserError as exc:
        return 0, [str(exc) if repr(split) in str(exc) else f"split {split!r}: {exc}"]
    if not data.names:
        problems.append(f"split {split!r} ({data.source}) has no usable image")
    problems += [f"{name}: no labels (split {split!r})" for name, row in zip(data.names, data.labels) if not row.any()]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        results = pool.map(decode_problem, data.image_paths)
        for problem in tqdm(results, total=len(data.image_paths), desc=f"decoding {split}", unit="img",
                            dynamic_ncols=True):
            if problem is not None:
                problems.append(problem)
    return len(data.names), problems


def check(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    kind, root = resolve_dataset(args.data_dir, args.dataset)
    splits = args.split or list(default_splits(kind))
    checked, problems = 0, []
    for split in splits:
        count, found = check_split(kind, root, split, args.keep_unlabelled, args.workers)
        checked += count
        problems += found
    if problems:
        print("\n".join(problems), flush=True)
        fail(f"{len(problems)} problem(s) in {root} ({kind}, splits {', '.join(splits)}; listed above): re-download "
             f"or remove the broken images, fix the annotation/list lines, or pass --skip_bad_images when training")
    print(f"ok: {checked} images of {root} ({kind}, splits {', '.join(splits)}) decode and have labels")
    return 0


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: check(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
