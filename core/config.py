"""Command-line flags shared by every training script, with Puzzle-CAM's names where they exist."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from core.builder import ARCHITECTURES, BN_MODES, HEADS
from core.plugins import load_plugins
from core.strategies import KEYPOINT_DEFAULTS, STRATEGIES
from tools.augment import AUGMENT_CHOICES
from tools.datasets import DATASET_KINDS, DEFAULT_SPLITS
from tools.demo_formats import DEMO_FORMATS
from tools.errors import UserError

load_plugins()  # the --strategy choices, and every tool that reads a run's strategy, include the plug-ins

# --demo: each script's own recipe scaled down to a CPU. Kept from the script (its DEFAULTS): head, tile calls,
# BatchNorm grouping (--reference_gpus 4), loss weights and their schedule; kept from the reference: SGD lr 0.1
# with its effective momentum 1e-4, the four parameter groups and the poly schedule. Changed, and only these:
# the architecture (resnet18 from the demo backbone, tools/demo_backbone.py, the demo's stand-in for ImageNet),
# the image size (112 px crops of 96-160 px resizes; min_distance 5 is the reference's 20 px at 512 scaled
# to 112), the batch size (16), the epochs (3) and the data (the generated demo set). A script may still change
# this recipe (its DEFAULTS' "demo_recipe"): only Max does, a measured exception (docs/miniature.md, Max).
DEMO_DEFAULTS = dict(
    architecture="resnet18", pretrained="demo", image_size=112, min_image_size=96, max_image_size=160,
    batch_size=16, max_epoch=3, num_workers=1, min_distance=5,
    train_split="main:train", val_split="main:val", print_ratio=0.25,
)


# Keys of a script's DEFAULTS that are not flag defaults: its --help text, its strategy (the default of
# --strategy) and its own changes to the --demo recipe.
SCRIPT_KEYS = ("description", "strategy", "demo_recipe")

class Settings(argparse.Namespace):
    """The training flags, read-only once parse_args returns them: what a run derives from them (the dataset's
    facts, --resume auto's answer) lives in the objects built from them (core/data.py RunData, core/trainer.py
    Run), never written back here."""

    def __init__(self, **values) -> None:
        self.__dict__.update(values)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"the settings are read-only after parsing (tried to set {name}); "
                             "use settings.replace(...) for a changed copy")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the settings are read-only after parsing (tried to delete {name})")

    def replace(self, **changes) -> Settings:
        """A copy with `changes` (tests, benchmarks: one flag varied over a parsed recipe)."""
        return Settings(**{**vars(self), **changes})


def str2bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes", "y"):
        return True
    if value.lower() in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def patch_chunk_value(value: str) -> str | int:
    """--patch_chunk: "auto" or a non-negative number of tiles."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of tiles, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {number}")
    return number


def resume_value(value: str) -> str:
    """--resume takes no value (True: a checkpoint must exist) or "auto"; a saved config holds True/False."""
    if value != "auto":
        raise argparse.ArgumentTypeError(f"expected no value or auto, got {value!r}")
    return value


def num_workers_value(value: str) -> str | int:
    """--num_workers: "auto" (sized from the CPUs, core/runtime.py) or a number; negatives are refused later,
    in one line naming the flag."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of worker processes, got {value!r}") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage on error; we keep the one-line error and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _data_flags(a: Callable) -> None:
    """--data_dir, --demo, splits, workers."""
    a("--data_dir", free=True, default=None, help="the dataset folder: VOC (holding JPEGImages/, Annotations/, or "
      "VOCdevkit/VOCyyyy under it), COCO (annotations/, train2014/, val2014/) or a list folder (classes.txt)")
    a("--dataset", default=None, choices=DATASET_KINDS, help="the dataset's format and protocol (default: "
      "detected from --data_dir's layout)")
    a("--demo", nargs="?", const="voc", default=None, choices=DEMO_FORMATS,
      help="generate the demo set in this format (once, into a cache folder) and use the CPU recipe")
    a("--train_split", default=None, help="default: the dataset's (" + "; ".join(
      f"{k} {t}" for k, (t, _) in DEFAULT_SPLITS.items()) + "); VOC: a name (data/NAME.txt for VOC2012, else "
      "ImageSets/Main/NAME.txt), main:NAME for the devkit list, or a .txt path; COCO: train2014/val2014; "
      "list: NAME for NAME.csv or a .csv path")
    a("--val_split", default=None, help="default: the dataset's (" + "; ".join(
      f"{k} {v}" for k, (_, v) in DEFAULT_SPLITS.items()) + ")")
    a("--eval_resize", default="auto", choices=["auto", "fit", "none"], help="validation images: fit = resize "
      "the long side to --image_size first; none = the reference's top-left window at the native scale; auto = fit "
      "for COCO and list data, none for VOC")
    a("--keep_unlabelled", action="store_true", help="COCO: keep the images without any annotation (the "
      "protocol leaves them out)")
    a("--skip_bad_images", free=True, action="store_true",
      help="skip unreadable images with a warning instead of stopping")
    a("--num_workers", free=True, type=num_workers_value, default="auto",
      help="DataLoader worker processes per process; auto: the CPUs this process may use, minus one for itself "
      "(split between the processes of a torchrun node, at most 8)")


def _network_flags(a: Callable) -> None:
    """Backbone, BatchNorm, head, initial weights."""
    a("--architecture", default="resnet50", choices=sorted(ARCHITECTURES),
      help="torchvision ResNet at output stride 16 (resnet18/34: BasicBlock, 512 channels, for CPU runs)")
    a("--mode", default="normal", choices=BN_MODES,
      help="BatchNorm: normal (the reference), fix = frozen statistics with trainable affine (ablation)")
    a("--head", default="gap", choices=HEADS,
      help="csi: score each class through its Class-Specific Instance (OASS); gap: GAP of the class maps")
    a("--reference_gpus", type=int, default=4,
      help="BatchNorm statistics grouped as the reference's calls over N DataParallel GPUs (4: the published "
      "run; 1: one GPU)")
    a("--pretrained", default="imagenet", help="imagenet | demo (resnet18 pretrained once on a generated pretext "
      "set, tools/demo_backbone.py; --demo's default) | none (random init) | PATH to a torchvision ResNet state dict")


def _recipe_flags(a: Callable) -> None:
    """Optimiser, schedule, sizes, augmentation, logging, seed, device."""
    a("--batch_size", type=int, default=32, help="images per optimizer step, over all GPUs/processes together")
    a("--max_epoch", type=int, default=15, help="epochs; the poly schedule spans them")
    a("--max_iterations", free=True, type=int, default=None, help="stop after N iterations, then evaluate and save")
    a("--lr", type=float, default=0.1, help="base lr of the parameter groups: ResNet weights x1 (with weight "
      "decay), ResNet biases x2, the other weights (class-map conv, CSI head) x10 (with weight decay), biases x20")
    a("--wd", type=float, default=1e-4, help="weight decay")
    a("--momentum", type=float, default=1e-4, help="SGD momentum; 1e-4 is the reference's effective value")
    a("--clip_grad_norm", type=float, default=0.0,
      help="clip the student's gradient to this total norm before each step (0: off, the reference). A guard "
      "against the CAM normalisation's 1/(max + 1e-5) gradient when a class map's peak is near zero")
    a("--nesterov", type=str2bool, default=True, help="Nesterov momentum (true or false)")
    a("--image_size", type=int, default=512, help="training crop and validation pad size (a multiple of 16)")
    a("--min_image_size", type=int, default=320, help="random long side before the crop: at least this")
    a("--max_image_size", type=int, default=640, help="random long side before the crop: at most this")
    a("--warmup_epoch", type=int, default=0, help="the reference's step warm-up of the lr (0: off): lr x (step // E "
      "+ 1) / warmup_epoch while step < (warmup_epoch - 1) E, E = --warmup_epoch_iterations")
    a("--warmup_epoch_iterations", type=int, default=661,
      help="iterations per warm-up epoch; 661 is hard-coded in the reference (train_aug at batch 16)")
    a("--augment", default="", choices=list(AUGMENT_CHOICES),
      help="extra training augmentation of the reference: colorjitter, randaugment or both")
    a("--print_ratio", free=True, type=float, default=0.1, help="log every print_ratio of an epoch")
    a("--seed", type=int, default=0, help="seed of the weights and of every sample's augmentation")
    a("--device", free=True, default="auto", help="auto | cpu | cuda | cuda:N")


def _oass_flags(a: Callable, defaults: dict) -> None:
    """Strategy, loss weights, keypoints, teacher, tiles."""
    a("--strategy", default=defaults.get("strategy", "none"), choices=sorted(STRATEGIES),
      help="the auxiliary task (default: the script's): " + "; ".join(
          f"{s.name} = {s.summary}" for s in STRATEGIES.values()))
    a("--alpha_re", type=float, default=0.0, help="weight of the re-construction loss (after warm-up)")
    a("--alpha_schedule_re", type=float, default=0.5,
      help="fraction of training over which alpha_re ramps up (0: constant alpha_re)")
    a("--alpha_p", type=float, default=1.0, help="weight of the patch classification loss")
    a("--alpha", free=True, type=float, default=None, help="Puzzle-CAM's name for --alpha_re")
    a("--alpha_schedule", free=True, type=float, default=None, help="Puzzle-CAM's name for --alpha_schedule_re")
    a("--re_loss", default="L1_Loss", choices=["L1_Loss", "L2_Loss"])
    a("--re_loss_option", default="masking", choices=["masking", "none"],
      help="masking: re-construction error only on the task's target classes")
    a("--num_pieces", type=int, default=4, choices=[4], help="Puzzle-CAM flag; OASS always cuts into 4")
    a("--k", type=int, default=KEYPOINT_DEFAULTS.k, help="peaks per class for the top-k strategies")
    a("--min_distance", type=int, default=KEYPOINT_DEFAULTS.min_distance,
      help="peak suppression radius in input pixels")
    a("--patch_bn_update", default="reference", choices=["reference", "off"],
      help="reference: tile calls through the student update its BatchNorm running statistics (Max, Puzzle-CAM); "
      "off: only its batch calls do")
    a("--tile_calls", default=None, choices=["task", "batch"],
      help="how tiles meet the patch network, which sets their BatchNorm statistics: task = one call of 4 "
      "tiles per task (OASS), batch = one call of all the batch's tiles (Puzzle-CAM) (default: the strategy's)")
    a("--keypoint_rule", default=KEYPOINT_DEFAULTS.keypoint_rule, choices=["reference", "clean"],
      help="reference: the official scripts' rules, quirks included; clean: float means, no 128-px filter")
    a("--alpha_ema", type=float, default=0.99, help="EMA teacher momentum (upper bound of the warm-up)")
    a("--patch_network", default=None, choices=["teacher", "student"],
      help="network the tiles go through (default: the strategy's)")
    a("--patch_chunk", free=True, type=patch_chunk_value, default="auto",
      help="tiles per forward of the patch network: auto (by device and tile size, core/step.py), 0 = all at "
      "once, N = N tiles (rounded down to whole tasks of 4)")


def _run_flags(a: Callable) -> None:
    """Speed, evaluation and outputs."""
    a("--amp", default="off", choices=["off", "bf16", "fp16"],
      help="autocast: bf16 on CPU or GPU, fp16 on CUDA only (with a GradScaler saved in the checkpoint)")
    a("--accum_steps", free=True, type=int, default=1,
      help="micro-batches per optimizer step (batch_size is the total)")
    # evaluation and outputs
    a("--eval_batch_size", free=True, type=int, default=None, help="validation batch (default: --batch_size)")
    a("--tag", free=True, default=None,
      help="name of the run's logs and checkpoints (default: <architecture>@<strategy>, "
      "demo@<strategy> under --demo)")
    a("--output_dir", free=True, default="experiments", help="folder of logs/, data/, models/ and tensorboard/")
    a("--save_every", free=True, type=int, default=0,
      help="also save the last checkpoint every N iterations (0: per epoch)")
    a("--resume", free=True, nargs="?", const=True, default=False, type=resume_value, metavar="auto",
      help="continue the run of --tag from <tag>_last.pth; --resume auto: continue when <tag>_last.pth exists, "
      "else start fresh (for requeued and restarted jobs, docs/cluster.md)")
    a("--overwrite", free=True, action="store_true", help="start --tag over, replacing its outputs")


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    p = OneLineParser(description=defaults.get("description"), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = flag_adder(p)
    for flags in (_data_flags, _network_flags, _recipe_flags):
        flags(add)
    _oass_flags(add, defaults)
    _run_flags(add)
    p.set_defaults(**{k: v for k, v in defaults.items() if k not in SCRIPT_KEYS})
    return p


def flag_adder(parser: argparse.ArgumentParser) -> Callable[..., argparse.Action]:
    """parser.add_argument that also takes free=True: the flag may differ when a run resumes (core/recipe.py)."""
    def add(*names: str, free: bool = False, **kwargs) -> argparse.Action:
        action = parser.add_argument(*names, **kwargs)
        action.free_on_resume = free
        return action
    return add


def free_flags() -> tuple[str, ...]:
    """The flags marked free=True where they are defined: they may differ when a run resumes (core/recipe.py)."""
    return tuple(action.dest for action in build_parser({})._actions if getattr(action, "free_on_resume", False))


def parse_args(defaults: dict, argv: list[str] | None = None) -> Settings:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(defaults)
    args = parser.parse_args(argv)
    if args.demo:  # the demo recipe (and the script's changes to it) replaces the defaults; explicit flags win
        parser.set_defaults(**{**DEMO_DEFAULTS, **defaults.get("demo_recipe", {})})
        if args.demo != "voc":  # the COCO and list demos use their dataset's own split names
            parser.set_defaults(train_split=None, val_split=None)
        args = parser.parse_args(argv)
    if args.alpha is not None:
        args.alpha_re = args.alpha
    if args.alpha_schedule is not None:
        args.alpha_schedule_re = args.alpha_schedule
    strategy = STRATEGIES[args.strategy]
    if args.patch_network is None:
        args.patch_network = strategy.patch_network
    if args.tile_calls is None:
        args.tile_calls = strategy.tile_calls
    if args.tag is None:
        demo = {None: None, "voc": "demo"}.get(args.demo, f"demo-{args.demo}")
        args.tag = f"{demo or args.architecture}@{args.strategy}"
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    validate_args(args)
    return Settings(**vars(args))


def demo_architecture_message(architecture: str) -> str:
    return (f"--pretrained demo is a resnet18 and cannot initialise --architecture {architecture}; pass "
            "--architecture resnet18, or --pretrained imagenet, none or PATH")


def reference_gpus_advice(args: argparse.Namespace) -> str:
    """Why --reference_gpus does not fit --batch_size, and the values that would (divisors of the batch)."""
    gpus, batch = args.reference_gpus, args.batch_size
    fits = [d for d in range(1, min(gpus, batch + 1)) if batch % d == 0]
    if not fits:  # built for every parse; only shown when reference_gpus >= 2 does not divide the batch
        return ""
    options = f"--reference_gpus {fits[0]}" + (f" (or {', '.join(map(str, fits[1:]))})" if fits[1:] else "")
    return (f"--reference_gpus {gpus} must divide --batch_size {batch} (each GPU's share); pass {options}, "
            f"or a --batch_size that is a multiple of {gpus}")


def validate_args(args: argparse.Namespace) -> None:
    """Reject flag values that make no sense, each with one line saying why."""
    checks = [
        (args.data_dir is None and not args.demo, "--data_dir is required (or pass --demo for the generated set)"),
        (args.pretrained == "demo" and args.architecture != "resnet18",
         demo_architecture_message(args.architecture)),
        (args.batch_size < 1, f"--batch_size must be at least 1, got {args.batch_size}"),
        (args.max_epoch < 1, f"--max_epoch must be at least 1, got {args.max_epoch}"),
        (args.max_iterations is not None and args.max_iterations < 1, "--max_iterations must be at least 1"),
        (args.image_size < 32 or args.image_size % 16,
         f"--image_size must be a multiple of 16 (the output stride) and at least 32, got {args.image_size}"),
        (not 0 < args.min_image_size <= args.max_image_size,
         "--min_image_size must be positive and at most --max_image_size"),
        (args.lr <= 0, f"--lr must be positive, got {args.lr}"),
        (args.wd < 0, f"--wd must not be negative, got {args.wd}"),
        (args.clip_grad_norm < 0, f"--clip_grad_norm must not be negative (0: off), got {args.clip_grad_norm}"),
        (args.momentum < 0 or args.momentum >= 1, f"--momentum must be in [0, 1), got {args.momentum}"),
        (args.nesterov and args.momentum == 0, "--nesterov true needs a positive --momentum"),
        (min(args.alpha_re, args.alpha_p) < 0, "loss weights --alpha_re/--alpha and --alpha_p must not be negative"),
        (not 0 <= args.alpha_schedule_re <= 1,
         f"--alpha_schedule_re must be in [0, 1] (0: constant), got {args.alpha_schedule_re}"),
        (args.reference_gpus < 1, f"--reference_gpus must be at least 1 (1: one GPU), got {args.reference_gpus}"),
        (args.reference_gpus >= 1 and args.batch_size % args.reference_gpus, reference_gpus_advice(args)),
        (args.warmup_epoch < 0, f"--warmup_epoch must not be negative (0: off), got {args.warmup_epoch}"),
        (args.warmup_epoch_iterations < 1, "--warmup_epoch_iterations must be at least 1"),
        (args.k < 1, f"--k must be at least 1, got {args.k}"),
        (args.min_distance < 0, f"--min_distance must not be negative, got {args.min_distance}"),
        (not 0 <= args.alpha_ema < 1, f"--alpha_ema must be in [0, 1), got {args.alpha_ema}"),
        (args.accum_steps < 1, f"--accum_steps must be at least 1, got {args.accum_steps}"),
        (args.num_workers != "auto" and args.num_workers < 0,
         f"--num_workers must not be negative (0: load in the main process; auto: from the CPUs), "
         f"got {args.num_workers}"),
        (not 0 < args.print_ratio <= 1, f"--print_ratio must be in (0, 1], got {args.print_ratio}"),
        (args.save_every < 0, "--save_every must not be negative"),
        (args.eval_batch_size < 1, "--eval_batch_size must be at least 1"),
        (args.resume and args.overwrite, "--resume and --overwrite exclude each other; pick one"),
        (any(c in args.tag for c in "/\\") or not args.tag.strip(), f"--tag {args.tag!r} must be a plain file name"),
    ]
    for bad, message in checks:
        if bad:
            raise UserError(message)
