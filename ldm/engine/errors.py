"""What stops a run other than its end, and how the command-line tools report it: a user error (a bad
setting, a missing file, bad data) prints one message and exits with status 2 (`--debug` shows the traceback
instead); a run stopped by a signal exits with 75 after writing a checkpoint, and one whose loss stopped being
finite with 3. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; resume with train.resume=latest
NONFINITE_EXIT_CODE = 3
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
INTERRUPTED_EXIT_CODE = 130  # stopped at once by a second signal
# Signals this close together are one request: Ctrl-C under `accelerate launch` reaches the trainer twice (SIGINT
# from the terminal, SIGTERM from the launcher), and must still write its checkpoint.
SAME_REQUEST_S = 1.0


class Preempted(Exception):
    """The run was asked to stop (a signal) and wrote a checkpoint first."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, step: int, checkpoint, signal_name: str):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint} is complete: "
                         f"run the same command with train.resume=latest to go on")


class StopAsked(Exception):
    """A signal asked the run to stop during a phase that is cut short rather than finished (caching, validation,
    sampling). During training the trainer catches it and writes its checkpoint (`Preempted`); raised before the
    first step, it ends the run with nothing to resume."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, signal_name: str, phase: str):
        self.signal_name, self.phase = signal_name, phase
        super().__init__(f"stopped by {signal_name} while {phase}, before any training step: there is nothing to "
                         f"resume; run the same command to start again (caches already built are kept)")


_STOP: dict = {"signal": None, "name": None, "at": 0.0, "depth": 0}


def check_stop(phase: str) -> None:
    """Raise `StopAsked` if a stop signal has come (inside `stop_signals`), naming ``phase``, what was cut short.
    In a run of several processes nothing is cut short (the others would wait for this one at their next
    collective call): the phase finishes and the run stops after it."""
    if _STOP["name"] is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise StopAsked(_STOP["name"], phase)


@contextlib.contextmanager
def stop_signals():
    """While the body runs, the first SIGTERM, SIGINT or SIGUSR1 only records that a stop was asked
    (``stop["signal"]``): training finishes its step and writes a checkpoint, and the phases that can be cut short
    stop at their next `check_stop`. Any later signal (more than `SAME_REQUEST_S` after the first) stops at once
    (KeyboardInterrupt, exit 130). Nested uses share one record; handlers are put back when the outermost ends.
    Only the main thread can install them; elsewhere nothing changes."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield _STOP
        return
    if _STOP["depth"]:
        _STOP["depth"] += 1
        try:
            yield _STOP
        finally:
            _STOP["depth"] -= 1
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if _STOP["signal"] is None:
            _STOP.update(signal=signum, name=name, at=time.monotonic())
            logger.warning("%s received: stopping (a training step in progress finishes and a checkpoint is written "
                           "first; a second signal stops at once, without one)", name)
        elif time.monotonic() - _STOP["at"] > SAME_REQUEST_S:
            raise KeyboardInterrupt(f"a second stop signal ({name})")

    _STOP.update(signal=None, name=None, at=0.0, depth=1)
    previous = {name: signal.signal(getattr(signal, name), handler) for name in STOP_SIGNALS if hasattr(signal, name)}
    try:
        yield _STOP
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)
        _STOP.update(signal=None, name=None, at=0.0, depth=0)


def stoppable(train):
    """A trainer's ``train`` with `stop_signals` installed from its set-up to its export: a stop while caching
    ends the run there, during training or validation it ends with a checkpoint, and one during the export (which
    is written whole or not at all) lets it finish."""
    import functools

    @functools.wraps(train)
    def run(*args, **kwargs):
        with stop_signals():
            return train(*args, **kwargs)

    return run


class NonFinite(Exception):
    """The loss or the gradients stopped being finite (``train.on_nonfinite=stop``); nothing after it was saved."""

    exit_code = NONFINITE_EXIT_CODE

    def __init__(self, step: int, last_good, checkpoint_every: int = 0):
        self.step, self.last_good = step, last_good
        if last_good:
            kept = f"the last good checkpoint is {last_good}"
        elif checkpoint_every:
            kept = f"there is no good checkpoint: it came before the first one (train.checkpoint_every={checkpoint_every})"
        else:
            kept = "there is no checkpoint (train.checkpoint_every=0 writes none)"
        super().__init__(f"the loss or the gradients became non-finite at step {step} (train.on_nonfinite=stop): "
                         f"no checkpoint or export was written after it; {kept}. Lower train.learning_rate, "
                         f"keep train.max_grad_norm > 0, or set train.on_nonfinite=skip_step")


def _file_errors() -> tuple:
    """The errors libraries raise for a file that cannot be read: safetensors' (a cut or corrupt header) and
    PIL's decompression bomb (its other errors are OSErrors)."""
    from PIL.Image import DecompressionBombError

    try:
        from safetensors import SafetensorError
    except ImportError:
        return (DecompressionBombError,)
    return (SafetensorError, DecompressionBombError)


# OSError covers what cannot be read or written (a damaged weight file, an image PIL cannot identify, a model not
# on this machine, a full disk): each is one line, without the traceback.
USER_ERRORS = (ValueError, OSError, *_file_errors())
USER_ERROR_EXIT_CODE = 2


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """Turn user errors into one message on stderr and exit status 2 (unless ``debug``), and a stopped run into
    its exit status."""
    try:
        yield
    except (Preempted, NonFinite, StopAsked) as e:
        _say(f"{'stopped' if isinstance(e, StopAsked) else type(e).__name__.lower()}: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:  # a trainer's second stop signal names itself; elsewhere a plain Ctrl-C
        _say(f"stopped at once by {e}: nothing was saved after the last checkpoint" if str(e) else "interrupted")
        sys.exit(INTERRUPTED_EXIT_CODE)
    except USER_ERRORS as e:
        if debug:
            raise
        _say(f"error: {e}\n(run with --debug for the traceback)")
        sys.exit(USER_ERROR_EXIT_CODE)


def _say(message: str) -> None:
    """``message`` on stderr on lines of its own, below any progress bar still drawn."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def die_with_parent() -> None:
    """Under `accelerate launch`, ask the kernel to send this process SIGTERM when its launcher dies.

    `accelerate launch` runs the trainer as a child and does not pass SIGTERM on: killing the launcher (what a
    cluster scheduler does on preemption) would leave the trainer running on as an orphan. With this, the
    launcher's death reaches the trainer as SIGTERM, which writes a checkpoint and stops. Linux only."""
    if not sys.platform.startswith("linux") or not any(k.startswith("ACCELERATE_") for k in os.environ):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        logger.warning("could not ask to be told of the launcher's death; stop the trainer itself on preemption")
        return
    if os.getppid() == 1:  # the launcher died before we asked
        os.kill(os.getpid(), signal.SIGTERM)
