"""The one training loop behind every script: classification + the strategy's puzzle tasks.

Setup lives beside it: core/runtime.py (devices, processes, random state), core/data.py (datasets,
sampler, loader), core/step.py (models, optimiser and the step itself), tools/run_files.py (logs,
history, checkpoint paths), core/evaluation.py (validation). This file wires them and runs the loop.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from core.config import parse_args
from core.data import RunData, build_data
from core.evaluation import THRESHOLD_KEYS, evaluate, log_val_cams
from core.localisation import format_summary
from core.preemption import StopRequest, fault_hook, resolve_resume
from core.recipe import check_resume, check_stop, current_script
from core.runtime import (
    Runtime,
    broadcast_buffers,
    environment,
    rng_states,
    seed_everything,
    set_rng_states,
    setup_runtime,
)
from core.step import StepContext, StepStats, alpha_re_at, build_step, train_step
from core.strategies import CONTRACT, STRATEGIES, outside_rule
from core.tb_logging import close_writer, log_scalars, make_writer
from tools.checkpoint import load_checkpoint_and_hash, plain_values, restore_states, save_checkpoint, write_json
from tools.errors import UserError, run_cli, user_message
from tools.images import BadImageError
from tools.metrics import chance_map
from tools.run_files import History, Logger, RunFiles, describe_config, log_field, save_val_scores


def main(defaults: dict) -> None:
    """Entry point of the training scripts: each passes only its defaults."""
    run_cli(lambda: train(parse_args(defaults)))


class Run:
    """A training run's state between iterations: what a checkpoint holds, the logs, the meters."""

    def __init__(self, args: argparse.Namespace, runtime: Runtime, data: RunData, files: RunFiles,
                 ctx: StepContext, resume: bool) -> None:
        self.args, self.runtime, self.data, self.files, self.ctx = args, runtime, data, files, ctx
        self.resume = resume
        # what checkpoints and the history record: the flags, with the values resolved by the data and --resume
        self.config = {**vars(args), **data.resolved_settings(), "resume": resume}
        self.iters_per_epoch = data.sampler.iterations_per_epoch
        self.total = args.max_epoch * self.iters_per_epoch
        self.stop_at = min(self.total, args.max_iterations or self.total)
        self.history = History(config=self.config.copy())
        self.iteration, self.best_map = 0, -1.0
        self.window: StepStats | None = None  # the sum of the steps' stats since the last log line
        self.window_steps, self.window_start = 0, time.time()
        # the first step with a non-finite loss, and the first whose cuts lay outside the image: [its iteration
        # (1-based, as the logs and the progress bar count), its stats]; -1 while there is none (None: no step yet)
        self.bad: torch.Tensor | None = None
        self.saved_iteration: int | None = None  # of <tag>_last.pth, once this process wrote or loaded it
        self.wall_start = time.time()
        self.log = Logger(files.log, runtime.is_main, append=resume)
        self.writer = None

    # ------------------------------------------------------------------------- checkpoints
    def restore(self) -> None:
        """Continue from <tag>_last.pth, refusing (before anything is restored or written) another
        script or recipe; the resume and the loaded file's hash are recorded in the history."""
        ctx, path = self.ctx, self.files.checkpoint("last")
        ckpt, sha = load_checkpoint_and_hash(path)
        changed = check_resume(ckpt, self.config, current_script(), path)
        check_stop(ckpt["iteration"], self.stop_at, self.total, path)
        restore_states(ckpt, path, model=ctx.bare_student, teacher=ctx.bare_teacher, optimizer=ctx.optimizer,
                       scaler=ctx.scaler)
        self.iteration, self.best_map = ckpt["iteration"], ckpt["best_mAP"]
        self.saved_iteration = self.iteration
        self.history = History.from_dict(ckpt["history"], config=self.config.copy())
        self.wall_start = time.time() - self.history.extra.get("wall_time", 0.0)
        set_rng_states(ckpt["rng"])
        self.record_checkpoint("last", sha)  # the file on disk; its own history could not hold its hash
        self.history.extra.setdefault("resumes", []).append(
            {"iteration": self.iteration, "checkpoint_sha256": sha, "changed": changed})

    def checkpoint_state(self) -> dict:
        ctx, teacher = self.ctx, self.ctx.bare_teacher
        self.history.extra["wall_time"] = time.time() - self.wall_start
        return {"model": ctx.bare_student.state_dict(),
                "teacher": teacher.state_dict() if teacher is not None else None,
                "optimizer": ctx.optimizer.state_dict(), "scaler": ctx.scaler.state_dict(),
                "iteration": self.iteration, "epoch": self.iteration / self.iters_per_epoch,
                "best_mAP": float(self.best_map), "config": plain_values(self.config), "script": current_script(),
                "history": plain_values(self.history.as_dict()), "rng": rng_states()}

    def record_checkpoint(self, which: str, sha: str) -> None:
        """Provenance: the file's SHA-256 at the top of the history and beside this iteration's validation."""
        self.history.extra.setdefault("checkpoint_sha256", {})[which] = sha
        validation = self.history.validation
        if validation and validation[-1]["iteration"] == self.iteration:
            validation[-1].setdefault("checkpoints", {})[which] = sha

    def kept_state(self) -> str:
        """What is left of the run when it stops now without saving: the last checkpoint, if there is one."""
        last = self.files.checkpoint("last")
        if not last.exists():
            return "no checkpoint was written yet"
        at = f" (iteration {self.saved_iteration})" if self.saved_iteration is not None else ""
        return f"{last} keeps the last good state{at}"

    def check_finite(self) -> None:
        """Stop (one line) at the first step whose loss was not finite or whose cuts left the image; one sync."""
        if self.bad is None:
            return
        names = self.window.names
        (nan_at, *nan_stats), (cut_at, *cut_stats) = self.bad.tolist()
        if cut_at >= 0 and (nan_at < 0 or cut_at <= nan_at):  # a cut outside the image can cause the divergence
            count = round(cut_stats[names.index("cuts_outside")])
            tasks = round(cut_stats[names.index("tasks_per_batch")])
            strategy = self.ctx.strategy
            raise UserError(f"strategy {strategy.name} ({strategy.module}) at iteration {int(cut_at)}: "
                            f"{outside_rule(count, tasks)}; {self.stopped(int(cut_at))} — fix its keypoint function "
                            f"({CONTRACT})")
        if nan_at >= 0:
            terms = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.window.loss_names, nan_stats))
            raise UserError(f"non-finite loss at iteration {int(nan_at)} ({terms}); {self.stopped(int(nan_at))} — "
                            "lower --lr or the loss weights")

    def stopped(self, bad_at: int) -> str:
        # the steps run ahead of the checks (no sync per step): say where the run is when it stops
        late = self.iteration > bad_at
        seen = f"found at iteration {self.iteration}, when the step statistics were next read; " if late else ""
        return f"{seen}stopped without saving, {self.kept_state()}"

    def check_weights(self) -> None:
        """A step can overflow the weights or BatchNorm's running statistics (the eval-mode forward's) even when
        its loss was finite: never evaluate or save those. One sync."""
        networks = [n for n in (self.ctx.bare_student, self.ctx.bare_teacher) if n is not None]
        values = [t for n in networks for t in n.state_dict().values() if t.is_floating_point()]
        if not torch.stack([t.isfinite().all() for t in values]).all():
            raise UserError(f"non-finite weights or BatchNorm statistics at iteration {self.iteration} (the training "
                            f"diverged while its losses were finite); {self.stopped(self.iteration)} — lower --lr or "
                            "the loss weights")

    def save(self, which: str) -> None:
        self.check_finite()
        self.check_weights()
        if self.runtime.is_main:
            self.record_checkpoint(which, save_checkpoint(self.checkpoint_state(), self.files.checkpoint(which)))
            if which == "last":
                write_json(self.history.as_dict(), self.files.history)
        if which == "last":
            self.saved_iteration = self.iteration

    # ------------------------------------------------------------------------- logging
    def log_header(self, chance: float) -> None:
        if not self.runtime.is_main:
            return
        args, data, strategy = self.args, self.data, self.ctx.strategy
        if self.resume:
            resume = self.history.extra["resumes"][-1]
            changed = "".join(f"; {k} {old} → {new}" for k, (old, new) in resume["changed"].items())
            self.log(f"# resumed from {self.files.checkpoint('last')} at iteration {self.iteration} "
                     f"(sha256 {resume['checkpoint_sha256']}{changed})")
        else:
            self.log(describe_config(self.config, {
                "data_root": data.root, "train_images": len(data.train_set), "val_images": len(data.val_set),
                "world_size": self.runtime.world_size, "device": self.runtime.device}))
        self.log(f"# strategy {strategy.name}: {strategy.summary}; patch network: {args.patch_network}")
        self.log(f"# chance level of val mAP (mean AP of random scores): {chance:.2f}%")
        for note in data.notes:
            self.log(f"# data: {note}")

    def record_step(self, stats: StepStats) -> None:
        """Accumulate the stats of the step just done (iteration `self.iteration`, 1-based) on the device;
        remember the first non-finite one and the first with cuts outside the image (no sync)."""
        values = stats.values
        if self.window is None:
            self.window = stats.with_values(torch.zeros_like(values))
            self.bad = values.new_full((2, 1 + len(stats.names)), -1.0)
        self.window.values.add_(values)
        step = torch.cat([values.new_full((1,), self.iteration), values])
        bad = torch.stack([~torch.isfinite(values[:stats.losses]).all(), stats["cuts_outside"] > 0])
        first = bad & (self.bad[:, 0] < 0)
        self.bad.copy_(torch.where(first[:, None], step, self.bad))
        self.window_steps += 1

    def log_train(self) -> None:
        self.check_finite()
        window = self.window
        mean = dict(zip(window.logged_names, (window.values / self.window_steps).tolist()))
        it, args = self.iteration, self.args
        alpha_re = alpha_re_at(args, it - 1, self.total)  # of the step just done
        losses = {name: mean.pop(name) for name in window.loss_names}
        row = {"iteration": it, "epoch": round(it / self.iters_per_epoch, 3),
               "lr": self.ctx.optimizer.param_groups[0]["lr"], **losses, "alpha_re": alpha_re, **mean,
               "seconds_per_iteration": (time.time() - self.window_start) / self.window_steps}
        self.history.train.append(row)
        if self.runtime.is_main:  # the JSON history follows the log, for live monitoring
            write_json(self.history.as_dict(), self.files.history)
        terms = " ".join(f"{name.removesuffix('_loss')} {value:.4f}" for name, value in losses.items())
        others = " ".join(log_field(name, value) for name, value in mean.items())
        self.log(f"[{it}/{self.total}] epoch {row['epoch']:.2f} lr {row['lr']:.4g} {terms} alpha_re {alpha_re:.3f} "
                 f"{others} {row['seconds_per_iteration']:.2f}s/it")
        log_scalars(self.writer, it, {f"train/{k}": v for k, v in row.items() if k != "iteration"})
        window.values.zero_()
        self.window_steps, self.window_start = 0, time.time()

    # ------------------------------------------------------------------------- validation
    def validate(self, chance: float) -> None:
        self.check_finite()
        self.check_weights()  # non-finite weights would make non-finite scores, which no AP can rank
        args, runtime, data, ctx = self.args, self.runtime, self.data, self.ctx
        # the bare module under DDP: ranks may run different numbers of eval batches, so no
        # collective may hide in the forward
        model = ctx.bare_student if runtime.distributed else ctx.student
        for network in (ctx.bare_student, ctx.bare_teacher):
            if network is not None:
                broadcast_buffers(network, runtime)
        skipped = self.history.extra.get("skipped_strategies", {})  # plug-ins whose keypoints failed in this run
        result = evaluate(model, data.val_set, data.val_targets, data.val_ignore, args, runtime, ctx.autocast, "val",
                          boxes=data.val_boxes, skip=skipped)
        for name, reason in result.get("skipped_strategies", {}).items():
            if name not in skipped:  # once per run; the run and its checkpoints go on
                self.log(f"# warning: {reason}; its hit rate is left out of this run's validations")
                self.history.extra.setdefault("skipped_strategies", {})[name] = reason
        localisation = result.get("localisation", {})  # needs boxes: VOC only
        record = {"epoch": round(self.iteration / self.iters_per_epoch, 3), "iteration": self.iteration,
                  "mAP": result["mAP"], "mAP_voc": result["mAP_voc"], "eval_class_loss": result["eval_class_loss"],
                  "num_images": result["num_images"], **{key: result[key] for key in THRESHOLD_KEYS},
                  **localisation}  # is the CAM on the object: pointing game, keypoint hit rates (VOC boxes)
        teacher = ctx.bare_teacher
        if teacher is not None:
            record["mAP_teacher"] = evaluate(teacher, data.val_set, data.val_targets, data.val_ignore, args, runtime,
                                             ctx.autocast, "val (teacher)")["mAP"]
        improved = record["mAP"] > self.best_map
        self.best_map = max(self.best_map, record["mAP"])
        record["best_mAP"] = self.best_map
        record["ap"], record["ap_voc"] = result["ap"], result["ap_voc"]
        self.history.validation.append(record)
        teacher_part = f" mAP_teacher {record['mAP_teacher']:.2f}" if teacher is not None else ""
        self.log(f"[val] epoch {record['epoch']:.2f} iteration {self.iteration}: mAP {record['mAP']:.2f} "
                 f"mAP_voc {record['mAP_voc']:.2f} CF1 {record['CF1']:.2f} OF1 {record['OF1']:.2f} "
                 f"top-3 CF1 {record['CF1_top3']:.2f} OF1 {record['OF1_top3']:.2f}{teacher_part} "
                 f"best {self.best_map:.2f} eval_class_loss {record['eval_class_loss']:.4f} "
                 f"(chance {chance:.2f}, {result['num_images']} images)"
                 f"{'; ' + format_summary(localisation) if localisation else ''}")
        scalars = {f"val/{k}": v for k, v in record.items()
                   if k.startswith(("mAP", "eval_")) or k in THRESHOLD_KEYS or k in localisation}
        log_scalars(self.writer, self.iteration, scalars)
        if self.writer is not None:
            log_val_cams(self.writer, self.iteration, ctx.bare_student, data.val_set, runtime.device)
        if improved:
            self.save("best")
            if runtime.is_main:  # the per-image evidence behind the best mAP (compare_experiments.py's bootstrap)
                save_val_scores(self.files.val_scores, data.val_names, result["scores"], data.val_targets,
                                data.val_ignore, iteration=self.iteration, mAP=record["mAP"],
                                mAP_voc=record["mAP_voc"])
        self.save("last")

    # ------------------------------------------------------------------------- the loop
    def validation_pending(self) -> bool:
        """At an epoch end (or the last iteration) without its validation record: a validation that failed."""
        due = self.iteration > 0 and (self.iteration % self.iters_per_epoch == 0 or self.iteration == self.stop_at)
        return due and all(v["iteration"] != self.iteration for v in self.history.validation)

    def loop(self, chance: float) -> None:
        args, sampler = self.args, self.data.sampler
        stop = StopRequest(self.runtime)
        log_every = max(1, int(self.iters_per_epoch * args.print_ratio))
        batches = None
        progress = tqdm(total=self.stop_at, initial=self.iteration, desc=args.tag, disable=not self.runtime.is_main,
                        dynamic_ncols=True)
        try:
            self.ctx.student.train()
            if self.validation_pending():  # resumed after a bad image stopped the last validation
                self.validate(chance)
            while self.iteration < self.stop_at:
                fault_hook(self.runtime.rank, self.iteration)
                if batches is None:
                    sampler.set_epoch(self.iteration // self.iters_per_epoch, self.iteration % self.iters_per_epoch)
                    batches = iter(self.data.loader)
                micro_batches = [next(batches)[:2] for _ in range(args.accum_steps)]
                stats = train_step(self.ctx, micro_batches, self.iteration, self.total)
                self.iteration += 1
                self.record_step(stats)
                progress.update(1)
                end_of_epoch = self.iteration % self.iters_per_epoch == 0
                if end_of_epoch:
                    batches = None
                if self.iteration % log_every == 0 or self.iteration == self.stop_at:
                    self.log_train()
                if end_of_epoch or self.iteration == self.stop_at:
                    self.validate(chance)
                elif args.save_every and self.iteration % args.save_every == 0:
                    self.save("last")
                signum = stop.agreed() if self.iteration < self.stop_at else 0
                if signum:
                    self.save("last")
                    self.log(f"# stopped by signal {signum} at iteration {self.iteration}; saved "
                             f"{self.files.checkpoint('last')}; continue with --resume (or --resume auto); "
                             f"exit code {128 + signum}")
                    raise SystemExit(128 + signum)
        except BadImageError as exc:
            # a broken image met mid-run: keep the progress, so that --resume after the fix loses nothing
            self.save("last")
            raise BadImageError(f"{user_message(exc)}; saved {self.files.checkpoint('last')}, continue with "
                                f"--resume once it is fixed") from None
        finally:
            stop.restore()
            progress.close()  # before any error line, so that the error stays the last line


def train(args: argparse.Namespace) -> dict:
    runtime = setup_runtime(args)
    seed_everything(args.seed)
    strategy = STRATEGIES[args.strategy]
    data = build_data(args, runtime)  # a wrong path or split is reported before anything is written
    files = RunFiles(Path(args.output_dir), args.tag)
    resume, start_over = resolve_resume(args, files)
    if runtime.is_main:
        files.prepare(resume, args.overwrite or bool(start_over))
    run = Run(args, runtime, data, files, build_step(args, runtime, len(data.class_names)), resume)
    if resume:
        run.restore()
    chance = chance_map(data.val_targets)
    run.history.extra.update({"chance_mAP": chance, "strategy_summary": strategy.summary,
                              "script": current_script(), "iterations_per_epoch": run.iters_per_epoch,
                              "total_iterations": run.total, "dataset": data.facts["dataset"],
                              "class_names": list(data.class_names)})
    run.history.add_environment(environment(runtime.device))
    run.log_header(chance)
    if start_over:
        run.log(start_over)
    run.writer = make_writer(files.root / "tensorboard" / args.tag) if runtime.is_main else None  # optional
    run.loop(chance)
    close_writer(run.writer)
    if runtime.is_main:
        run.history.extra["finished_iteration"] = run.iteration  # run_experiments.py: this command's run is complete
        write_json(run.history.as_dict(), files.history)
        run.log(f"# done: best val mAP {run.best_map:.2f}; checkpoints in {files.checkpoint('best').parent}")
    if runtime.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return run.history.as_dict()
