"""The training loop: `train(config)` runs (or resumes) a run to its end, one optimizer step at a
time, with its logs, checkpoints and evaluations.

    crate train --preset fashion-mnist                                   # the CPU demo (make demo)
    crate train --preset paper --data /data/imagenet                     # one GPU, the paper's recipe
    torchrun --standalone --nproc_per_node=8 -m crate.train --preset paper --data /data/imagenet

README "Training" lists the recipes and options, "Runs that survive a cluster" the stops and restarts.
"""

import contextlib
import itertools
import json
import logging
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import analysis, data
from ..models import CRATE
from ..runtime import precision_name, progress_interval
from ..weights import checkpoint
from .compiled import sdpa_backend
from .config import TrainConfig
from .faults import NonFiniteStepsError, PreemptedError, StopSignals, on_every_rank
from .setup import Run, check_before_training, set_up
from .verification import verify_run

log = logging.getLogger("crate.train")


def train(config: TrainConfig) -> dict:
    """Run (or resume) training; returns the final evaluation metrics. Rank 0 writes everything.

    Raises UnverifiedError when the gate fails (before any step), PreemptedError after SIGTERM or
    SIGUSR1 (once the current step is done on every rank and a checkpoint is written) and
    NonFiniteStepsError after --max-nonfinite-steps skipped steps in a row."""
    check_before_training(config)
    with sdpa_backend(config.sdpa_backend):  # the gate's and every step's attention alike
        return _train(set_up(config))


def _train(run: Run) -> dict:
    if run.distributed.is_main:
        _log_opening(run)
    progress = tqdm(
        mininterval=progress_interval(),  # a log file gets a line every 30 s
        total=run.total_steps,
        initial=run.step,
        disable=not run.distributed.is_main,
        unit="step",
        dynamic_ncols=True,
    )
    result, start_time, first_step = {}, time.perf_counter(), run.step
    try:
        verify_run(run)  # before the first step, on every rank (crate/train/verification.py)
        steps_start = time.perf_counter()
        with StopSignals() as signals:
            while run.step < run.session_end:
                tick = time.perf_counter()
                with contextlib.closing(epoch_steps(run)) as steps:  # closed on an exception too
                    for micro_batches in steps:
                        loss, applied, stop = optimizer_step(run, micro_batches, signals.received is not None)
                        progress.update(1)
                        if run.step == first_step + 1:
                            first_step_end = time.perf_counter()
                            if run.distributed.is_main:
                                _log_first_step(run, first_step_end - steps_start)
                        if run.step % run.config.log_every == 0 or run.step == run.session_end:
                            _log_step(run, loss, tick, progress)
                            tick = time.perf_counter()
                        if run.step == first_step + run.config.log_every and run.distributed.is_main:
                            _log_estimate(run, first_step, steps_start, first_step_end)
                        if not applied and run.nonfinite_in_a_row >= run.config.max_nonfinite_steps:
                            save_checkpoint(run)
                            raise NonFiniteStepsError(
                                f"{run.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                                f"gradient (up to step {run.step}); the last good weights are in "
                                f"{checkpoint.step_folder(run.output, run.step)}"
                            )
                        if stop and run.step < run.total_steps:
                            save_checkpoint(run)
                            raise PreemptedError(
                                f"stopped at step {run.step} on a stop signal; checkpoint "
                                f"{checkpoint.step_folder(run.output, run.step)}: rerun with --resume"
                            )
                        if checkpoint_due(run):
                            save_checkpoint(run)
                        if evaluation_due(run):
                            result = evaluate(run, start_time)
                            progress.write(run.objective.summary(result))
    finally:
        progress.close()
        if run.metrics_file:
            run.metrics_file.close()
    if run.session_end < run.total_steps and run.distributed.is_main:
        log.info(
            "stopped after step %d of %d (--stop-after): `crate train --output %s --resume` continues",
            run.step,
            run.total_steps,
            run.output,
        )
    if dist.is_initialized():
        dist.barrier()
    return result


# -- one optimizer step with its guards --------------------------------------------------------------
def epoch_steps(run: Run) -> Iterator[list]:
    """The current epoch's remaining optimizer steps, each a list of --accum-steps micro-batches' inputs
    (images and targets on the device, prepared before the step starts)."""
    epoch, batch_in_epoch = divmod(run.step, run.steps_per_epoch)
    if run.sampler is not None:
        run.sampler.set_epoch(epoch, batch_in_epoch)
    elif batch_in_epoch:  # a stream cannot skip to a batch: the epoch's remaining steps see its start
        log.warning("resumed mid-epoch on a streamed dataset: epoch %d's stream restarts", epoch)
    getattr(run.train_set, "set_epoch", lambda e: None)(epoch)
    run.loader.generator.manual_seed(hash((run.config.seed, epoch, run.distributed.rank)) % 2**63)
    run.model.train()
    steps = min(run.steps_per_epoch - batch_in_epoch, run.session_end - run.step)
    batches = itertools.islice(run.loader, steps * run.config.accum_steps)  # none read beyond them
    with contextlib.closing(micro_batch_inputs(run, batches)) as micro_batches:
        for _ in range(steps):
            step_inputs = list(itertools.islice(micro_batches, run.config.accum_steps))
            if len(step_inputs) < run.config.accum_steps:  # a stream may yield fewer batches than an epoch's
                return
            yield step_inputs


def micro_batch_inputs(run: Run, batches: Iterator) -> Iterator:
    """Each batch's (images, targets) on the device, None for a batch of unreadable images only; with
    ``run.prefetch`` each prepared in a thread while the step before runs (crate/data/prefetch.py)."""

    def inputs(batch):
        return None if batch is None else run.inputs(batch)

    if run.prefetch:
        return data.prefetched(batches, inputs, run.distributed.device)
    return (inputs(batch) for batch in batches)


def optimizer_step(run: Run, micro_batches: list, stop_requested: bool) -> tuple[torch.Tensor, bool, bool]:
    """Forward and backward over one step's micro-batches (each (images, targets) on the device, or None
    when all its images were unreadable), then the optimizer, schedule and EMA update, unless the loss
    or a gradient is NaN or inf on any rank: then every rank skips the update alike. Returns (mean
    loss, whether the update was applied, whether any rank was asked to stop)."""
    config, device = run.config, run.distributed.device
    loss = torch.zeros((), device=device)
    for index, inputs in enumerate(micro_batches):
        if inputs is None:  # every image of the micro-batch was unreadable
            run.skipped_images += run.micro_batch
            continue
        images, targets = inputs
        run.skipped_images += run.micro_batch - len(targets)
        if not len(targets):  # every JPEG of the micro-batch failed to decode on the device
            continue
        if run.mixup:
            images, targets = run.mixup(images, targets)
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not dist.is_initialized() else run.train_model.no_sync()
        with sync:
            micro_loss = run.forward_loss(images, targets) / config.accum_steps
            micro_loss.backward()
        loss += micro_loss.detach().float()
        run.images_seen += len(images) * run.distributed.world_size
    gradients = [p.grad for p in run.model.parameters() if p.grad is not None]
    if config.grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm(gradients)
    finite, stop = on_every_rank(torch.isfinite(loss) & torch.isfinite(grad_norm), stop_requested)
    if finite:
        run.optimizer.step()
        run.nonfinite_in_a_row = 0
    else:
        _report_nonfinite(run, loss)
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if finite:
        run.scheduler.step_update(run.step)
        if run.ema is not None:
            run.ema.update(run.model, step=run.step)
    return loss, finite, stop


def _report_nonfinite(run: Run, loss: torch.Tensor) -> None:
    run.nonfinite_steps += 1
    run.nonfinite_in_a_row += 1
    parameter = next(
        (n for n, p in run.model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()),
        None,
    )
    log.warning(
        "step %d: loss %s, first non-finite gradient: %s; optimizer and schedule update skipped "
        "(%d in a row, %d in all)",
        run.step + 1,
        loss.item(),
        parameter,
        run.nonfinite_in_a_row,
        run.nonfinite_steps,
    )
    _write(
        run.metrics_file,
        dict(
            step=run.step + 1,
            nonfinite_loss=loss.item(),
            nonfinite_gradient=parameter,
            nonfinite_steps=run.nonfinite_steps,
        ),
    )


def _log_step(run: Run, loss: torch.Tensor, tick: float, progress: tqdm) -> None:
    record = dict(
        step=run.step,
        epoch=run.step / run.steps_per_epoch,
        loss=loss.item(),
        lr=run.optimizer.param_groups[0]["lr"],
        images_per_s=run.images_seen / (time.perf_counter() - tick),
        nonfinite_steps=run.nonfinite_steps,
    )
    progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
    _write(run.metrics_file, record)
    run.images_seen = 0


def _log_opening(run: Run) -> None:
    """The run before its first step: where it writes, which model on which data, on what, how long."""
    config, model = run.config, run.model
    parameters = sum(p.numel() for p in model.parameters())
    start = (
        f"resuming at step {run.step}"
        if run.step
        else ("fine-tuning " + config.finetune if config.finetune else "from scratch")
    )
    log.info("output: %s", run.output)
    log.info(
        "model: %s, %.2fM parameters, %s, %s",
        config.model,
        parameters / 1e6,
        run.objective.describe(model),
        start,
    )
    log.info(
        "data: %s, %s training images, %s evaluation images",
        config.dataset,
        _size(run.train_set),
        _size(run.test_loader.dataset),
    )
    log.info(
        "device: %s, precision %s, %d process%s, %d images per step (%d per forward pass)",
        run.distributed.device,
        precision_name(run.distributed.device, config.amp),
        run.distributed.world_size,
        "es" if run.distributed.world_size > 1 else "",
        config.batch_size,
        run.micro_batch,
    )
    planned = f"{config.epochs} epochs x {run.steps_per_epoch} steps"
    if run.total_steps < config.epochs * run.steps_per_epoch:
        planned = f"--max-steps {config.max_steps} (of {planned})"
    session = (
        f", this session to step {run.session_end} (--stop-after)"
        if run.session_end < run.total_steps
        else ""
    )
    log.info("steps: %d planned, %s, cosine schedule over them%s", run.total_steps, planned, session)
    log.info("step: %s, SDPA backend %s", _step_kind(run), config.sdpa_backend)


def _step_kind(run: Run) -> str:
    """compile on (its mode, the optimizer fused or not) or off, and whether by default or by option."""
    given = "default for " + run.distributed.device.type if run.config.compile is None else "option"
    fused = any(group.get("fused") for group in run.optimizer.param_groups)
    optimizer = f"{type(run.optimizer).__name__}{' fused' if fused else ''}"
    if run.compiled:
        return f"torch.compile on (mode {run.config.compile_mode}; {given}), {optimizer}"
    return f"torch.compile off (eager; {given}), {optimizer}"


def _size(dataset) -> str:
    return str(len(dataset)) if hasattr(dataset, "__len__") else "streamed"


def _log_first_step(run: Run, seconds: float) -> None:
    """The session's first step, which compiles the step when compiled: its time is the compile time."""
    what = "torch.compile compiling the step" if run.compiled else "eager"
    log.info("first step: %.1f s (%s)", seconds, what)


def _log_estimate(run: Run, first_step: int, start_time: float, first_step_end: float) -> None:
    """Seconds per steady step (after the first, which compiles when compiled) and the time left."""
    steady = run.step - first_step - 1
    if steady:
        seconds_per_step = (time.perf_counter() - first_step_end) / steady
    else:
        seconds_per_step = first_step_end - start_time
    remaining = seconds_per_step * (run.session_end - run.step)
    log.info("%.3f s per step: about %s to step %d", seconds_per_step, _duration(remaining), run.session_end)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


# -- checkpoints and evaluations --------------------------------------------------------------------
def checkpoint_due(run: Run) -> bool:
    return run.step % run.config.checkpoint_every == 0 or _epoch_end(run) or run.step == run.session_end


def save_checkpoint(run: Run) -> None:
    """Rank 0 writes the model, optimizer and every rank's RNG states (gathered); all ranks wait for it."""
    if run.saved_step == run.step:
        return
    states = [checkpoint.rng_state()]
    if dist.is_initialized():
        gathered = [None] * run.distributed.world_size if run.distributed.is_main else None
        dist.gather_object(states[0], gathered, dst=0)
        states = gathered
    if run.distributed.is_main:
        checkpoint.save(
            run.output, run.step, run.model, run.optimizer, run.ema, run.config.keep_checkpoints, states
        )
    if dist.is_initialized():
        dist.barrier()
    run.saved_step = run.step


def _epoch_end(run: Run) -> bool:
    epoch, batch_in_epoch = divmod(run.step, run.steps_per_epoch)
    return batch_in_epoch == 0 and epoch % run.config.eval_every == 0


def evaluation_due(run: Run) -> bool:
    return _epoch_end(run) or run.step == run.session_end


def evaluate(run: Run, start_time: float) -> dict:
    """The objective's measures over the whole evaluation set (each image once, over all ranks): top-1,
    top-5 and loss of a classifier, the masked-patch reconstruction MSE of an autoencoder; of the EMA
    model when there is one, and the white-box telemetry of CRATE models; written to metrics.jsonl."""
    if run.skipped_images:
        log.warning("%d unreadable training images skipped so far (paths logged above)", run.skipped_images)
    evaluated = run.ema.module if run.ema is not None else run.model
    device = run.distributed.device
    result = dict(
        step=run.step,
        epoch=run.step / run.steps_per_epoch,
        **run.objective.measure(evaluated, run.test_loader, device, run.autocast),
    )
    result["train_time_s"] = time.perf_counter() - start_time
    if isinstance(evaluated, CRATE) and run.telemetry_images is not None:  # CRATE and CRATE-α (a subclass)
        result["whitebox_images"] = len(run.telemetry_images)
        result["whitebox"] = analysis.audit(evaluated, run.telemetry_images.to(device))
    _write(run.metrics_file, result)
    return result


def _write(handle, record: dict) -> None:
    if handle is not None:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
