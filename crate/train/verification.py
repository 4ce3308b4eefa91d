"""The gate before the first step: every rank checks its model on its own device, in the run's
precision and options (crate/verify), after any --resume or --finetune loading; rank 0 writes
verification.json and the verdict is the session's first metrics line; a failure on any rank stops
every rank before any step, with no checkpoint written (exit 70)."""

import json
import logging

import torch.distributed as dist

from ..verify import EXIT_FAILED, check_model
from ..verify.families import has_reference
from ..verify.rule import default_precision
from .setup import Run

log = logging.getLogger("crate.train")

IMAGES = 2  # of the evaluation set's first images: the cost is that of a forward and backward of 2


class UnverifiedError(RuntimeError):
    exit_code = EXIT_FAILED


def verify_run(run: Run) -> dict:
    """The gate's record (also written to verification.json and metrics.jsonl); raises UnverifiedError
    when the check fails on any rank."""
    config, device = run.config, run.distributed.device
    record = dict(event="verification", step=run.step, skipped=False)
    if config.skip_verify:
        log.warning(
            "--skip-verify: this run trains WITHOUT checking that its model computes the derived CRATE "
            "on %s in its precision and options; the run folder records that it was skipped",
            device,
        )
        reports, record["skipped"] = [], True
    elif not has_reference(run.model):
        log.info("%s has no float64 reference: the gate does not apply", type(run.model).__name__)
        reports, record["skipped"] = [], True
    else:
        images = run.telemetry_images[:IMAGES] if run.telemetry_images is not None else None
        report = check_model(
            run.model,
            default_precision(device, config.amp),
            images=images,
            compiled=run.compiled,
            compile_mode=config.compile_mode,
        )
        reports = _gathered(report.to_dict() | dict(rank=run.distributed.rank))
    failed = [report for report in reports if not report["passed"]]
    record |= dict(
        passed=None if record["skipped"] else not failed,
        verdict=failed[0]["verdict"] if failed else (reports[0]["verdict"] if reports else "skipped"),
        seconds=max((report["seconds"] for report in reports), default=0.0),
        ranks=len(reports),
    )
    if run.distributed.is_main:
        text = json.dumps(record | dict(reports=reports), indent=2)
        (run.output / "verification.json").write_text(text + "\n")
        if run.metrics_file is not None:
            run.metrics_file.write(json.dumps(record) + "\n")
            run.metrics_file.flush()
    if failed:
        where = f"rank {failed[0]['rank']} ({failed[0]['device']}, {failed[0]['precision']})"
        raise UnverifiedError(
            f"the gate failed on {where}: {failed[0]['verdict']}; no step was taken "
            f"(table: {run.output / 'verification.json'}; --skip-verify trains anyway)"
        )
    if not record["skipped"]:
        log.info("verification %s", record["verdict"])
    return record


def _gathered(report: dict) -> list[dict]:
    """Every rank's report (ranks can sit on different GPU models)."""
    if not dist.is_initialized():
        return [report]
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    return reports
