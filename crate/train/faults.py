"""What stops a run, and how it says so: the exit codes of `crate train`, the stop signals of a cluster,
and the agreement of every rank on a non-finite step or a stop."""

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger("crate.train")

# `crate train` exits with 0 when done, 2 for a bad configuration (one line naming the option), and:
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: SIGTERM or SIGUSR1 arrived, a checkpoint was written: resume
EXIT_NONFINITE = 65  # sysexits' EX_DATAERR: --max-nonfinite-steps steps in a row had a NaN/inf loss or
#                      gradient; the checkpoint holds the last good weights (resuming continues after them)
# and EXIT_UNVERIFIED = 70 (sysexits' EX_SOFTWARE, crate/verify/gate.py): the gate found that the model does
# not compute the derived CRATE on this device, precision and options; no step was taken
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what clusters send before preempting (SLURM: --signal)


class PreemptedError(Exception):
    exit_code = EXIT_PREEMPTED


class NonFiniteStepsError(RuntimeError):
    exit_code = EXIT_NONFINITE


class StopSignals:
    """While open, SIGTERM and SIGUSR1 set ``received`` instead of ending the process: the training loop
    finishes the step, agrees with the other ranks, checkpoints and raises PreemptedError."""

    def __enter__(self) -> "StopSignals":
        self.received, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self.previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def _handle(self, number: int, frame) -> None:
        self.received = signal.Signals(number).name
        log.warning("%s received: stopping after this step with a checkpoint", self.received)

    def __exit__(self, *exception) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def on_every_rank(finite: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """(finite on every rank, stop asked on any rank): one all-reduce, so that all ranks decide alike."""
    flags = torch.stack([~finite, torch.tensor(stop_requested, device=finite.device)]).float()
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, stop = flags.tolist()
    return not nonfinite, bool(stop)
