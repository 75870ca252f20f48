"""What a person sees while raypose runs, and where everything else goes.

The terminal gets raypose's own lines, each once: one line per epoch (per trial in a sweep), one
line per finished trial and a sweep progress bar with the best value so far and an estimate of
the time left. Ray's and Tune's own records (worker output other than raypose's lines, Train's
controller messages, warnings, Tune's status tables) go to a log file whose path is printed when
Ray starts. `--verbose` (or RAYPOSE_VERBOSE=1, which jobs/ read) shows them on the terminal too.

Where the log goes: $RAYPOSE_LOG_DIR, else ~/.raypose/logs, one file per command run.
"""

import contextlib
import datetime
import io
import logging
import os
import sys
import threading
import time
from pathlib import Path

# Set by the first Ctrl-C or SIGTERM of the command (raypose.cli installs note_interrupt). A
# KeyboardInterrupt raised inside Ray's calls can be lost there (a signal that lands while Ray
# waits on its own tasks); the flag is not, and raypose.cluster.driver.run_interruptible checks it.
_INTERRUPTED = threading.Event()


def note_interrupt(signum=None, frame=None):
    """A signal handler: remember the stop, then stop as Ctrl-C does."""
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether the command has been asked to stop (Ctrl-C or SIGTERM)."""
    return _INTERRUPTED.is_set()


VERBOSE_ENV = "RAYPOSE_VERBOSE"
PREFIX = "[raypose]"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no")


class _State:
    log_file = None
    log_path: Path | None = None
    lock = threading.Lock()
    terminal = None  # the real stdout while quiet() sends everything else to the log


def format_value(v) -> str:
    """A hyperparameter's value as the sweep's lines and tables show it."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def say(line: str) -> None:
    """One of raypose's own lines, to the terminal even inside quiet()."""
    print(line, file=_State.terminal or sys.stdout, flush=True)


class _LogStream(io.TextIOBase):
    """A stdout/stderr stand-in that writes whole lines to the log file."""

    def __init__(self, label: str):
        self.label, self.pending = label, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                write_log(f"({self.label}) {line}")
        return len(text)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def quiet():
    """While Ray Train or Tune runs in this process, whatever they print (Tune's experiment
    banner and tables, the raylet's warnings) goes to the log file; raypose's own lines still
    reach the terminal through say(). With --verbose nothing is redirected."""
    if verbose() or _State.log_file is None or _State.terminal is not None:
        yield
        return
    _State.terminal = sys.stdout
    route_loggers()
    try:
        with (
            contextlib.redirect_stdout(_LogStream("stdout")),
            contextlib.redirect_stderr(_LogStream("stderr")),
        ):
            yield
    finally:
        _State.terminal = None


def log_path() -> Path | None:
    return _State.log_path


def open_log(command: str) -> Path:
    """The run's log file (created once per process)."""
    if _State.log_file is None:
        folder = Path(os.environ.get("RAYPOSE_LOG_DIR") or Path.home() / ".raypose" / "logs")
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        _State.log_path = folder / f"{command}-{stamp}-{os.getpid()}.log"
        _State.log_file = open(_State.log_path, "a", buffering=1, encoding="utf-8")
    return _State.log_path


def write_log(line: str) -> None:
    if _State.log_file is not None:
        with _State.lock:
            _State.log_file.write(line.rstrip("\n") + "\n")


class _LogHandler(logging.Handler):
    """Writes records to the current log file (whichever open_log opened last)."""

    raypose = True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_log(self.format(record))
        except Exception:  # logging must never break the run
            self.handleError(record)


def _file_handler() -> logging.Handler:
    handler = _LogHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def _has_ours(logger) -> bool:
    return any(getattr(h, "raypose", False) for h in logger.handlers)


def route_loggers() -> None:
    """Ray's, Tune's and Optuna's loggers write to the log file (and, unless verbose, nowhere
    else). Called before ray.init, whose own warnings would otherwise reach the terminal, and
    again whenever Ray or Optuna may have set up loggers of their own since.

    The file handler sits on the root logger and the libraries' loggers pass their records up
    to it: ray.init clears the "ray" logger's handlers (setup_component_logger in
    ray/_private/ray_logging), and a logger left with no handler on its way up would print
    through Python's last-resort stderr handler."""
    if _State.log_file is None:
        return
    tops = ("ray", "py.warnings", "optuna")
    if verbose():
        # Ray's and Optuna's own handlers stay; the log file gets a copy
        for name in tops:
            if not _has_ours(logging.getLogger(name)):
                logging.getLogger(name).addHandler(_file_handler())
        return
    if "optuna" in sys.modules:
        sys.modules["optuna"].logging.disable_default_handler()
    root = logging.getLogger()
    if not _has_ours(root):
        root.addHandler(_file_handler())
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    for name in list(tops) + [
        n
        for n in list(logging.root.manager.loggerDict)
        if n.startswith(tuple(t + "." for t in tops))
    ]:
        logger = logging.getLogger(name)
        if isinstance(logger, logging.PlaceHolder):
            continue
        # Ray installs its own stderr handlers at import and in ray.init
        logger.handlers = [
            h
            for h in logger.handlers
            if not isinstance(h, logging.StreamHandler) or getattr(h, "raypose", False)
        ]
        if name in tops:
            logger.propagate = True
        elif not logger.propagate and not _has_ours(logger):
            logger.addHandler(_file_handler())
    logging.captureWarnings(True)


def route_ray_output(command: str) -> None:
    """Call right after ray.init: Ray's loggers go to the log file. The workers' own output
    stays in Ray's worker logs (ray.init(log_to_driver=False) unless verbose); raypose's lines
    from the workers reach the terminal through a LineRelay."""
    path = open_log(command)
    route_loggers()
    print(
        f"{PREFIX} Ray's own log lines: {path}"
        + ("" if verbose() else " (--verbose shows them here)"),
        flush=True,
    )


class LineRelay:
    """raypose's lines from the Ray Train workers, printed once by the driver.

    While in this context, `handle` is a ray.util.queue.Queue (an actor) that the run's rank 0
    worker puts its lines into (worker_say), and a thread of the driver prints them. Needs a
    connected Ray (ray.init first)."""

    POLL_S = 0.5

    def __init__(self):
        self.handle = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        from ray.util.queue import Queue  # Ray: a public queue actor

        self.handle = Queue(actor_options={"num_cpus": 0})  # never waits for a free CPU
        self._thread = threading.Thread(target=self._run, name="raypose-lines", daemon=True)
        self._thread.start()
        return self

    def _drain(self, timeout: float | None) -> None:
        from ray.util.queue import Empty

        try:
            line = self.handle.get(block=timeout is not None, timeout=timeout)
        except Empty:
            return
        say(line)
        while True:
            try:
                say(self.handle.get_nowait())
            except Empty:
                return

    def _run(self):
        import ray

        # once Ray is shut down (an interrupted run), a call on the queue would start a new
        # local instance
        while not self._stop.is_set() and ray.is_initialized():
            try:
                self._drain(self.POLL_S)
            except Exception:  # the queue's actor gone (Ray shut down): nothing more to print
                return

    def __exit__(self, *exc):
        import ray

        self._stop.set()
        # a get() under way when Ray was shut down (an interrupted run) never returns; the
        # thread is a daemon
        self._thread.join(timeout=self.POLL_S + 2.0)
        if not ray.is_initialized():
            return False
        try:
            self._drain(None)  # what the workers sent before the run ended
            self.handle.shutdown()
        except Exception:  # Ray already shut down (an interrupted run)
            pass
        return False


def worker_say(lines, line: str) -> None:
    """On a Ray Train worker: one of raypose's lines, to the worker's own log and, when the run
    has a LineRelay (lines: its handle), to the driver's terminal."""
    print(line, flush=True)
    if lines is not None:
        lines.put(line)


# ----------------------------------------------------------------------------------------------
# The sweep's lines: per epoch, per trial, and a progress bar


def bar(done: int, total: int, width: int = 20) -> str:
    filled = int(round(width * done / max(total, 1)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class SweepProgressState:
    """The bookkeeping behind the sweep's lines; plain Python, so tests can drive it directly."""

    def __init__(
        self,
        total_trials: int,
        max_epochs: int,
        metric: str,
        judged,
        out=None,
        clock=time.monotonic,
    ):
        self.total, self.max_epochs, self.metric, self.judged = (
            total_trials,
            max_epochs,
            metric,
            judged,
        )
        self.out, self.clock = out, clock
        self.start = clock()
        self.numbers: dict = {}  # trial id -> 1-based number in start order
        self.epochs: dict = {}  # trial id -> epochs finished
        self.finished: dict = {}  # trial id -> epochs it ran
        self.best = None  # (value, trial id)

    def _print(self, line: str) -> None:
        if self.out is not None:
            print(line, file=self.out, flush=True)
        else:
            say(line)

    def number(self, trial_id: str) -> int:
        if trial_id not in self.numbers:
            self.numbers[trial_id] = len(self.numbers) + 1
        return self.numbers[trial_id]

    def started(self, trial_id: str, params: dict) -> None:
        n = self.number(trial_id)
        shown = " ".join(f"{k}={format_value(v)}" for k, v in params.items())
        self._print(f"{PREFIX} trial {n}/{self.total} {trial_id} started: {shown}")

    def result(self, trial_id: str, result: dict) -> None:
        epoch = int(result.get("epoch", 0))
        if epoch <= self.epochs.get(trial_id, 0):
            return  # a repeated report (a restored trial re-reporting) prints nothing new
        self.epochs[trial_id] = epoch
        value = result.get("val_mpjpe")
        judged = self.judged(result)
        if judged and value is not None and (self.best is None or value < self.best[0]):
            self.best = (value, trial_id)
        if judged and value is not None:
            val = f"val_mpjpe {value:.1f} mm"
        elif result.get("has_regression_head") and "best_val_mpjpe" not in result:
            val = "no validation split"  # data.val_subjects=[]: the last epoch is the result
        else:
            val = "no regression head yet"
        base = result.get("val_mean_pose_mpjpe")
        peak = result.get("gpu_memory_peak_bytes")  # a trial on a GPU (or a share of one)
        self._print(
            f"{PREFIX} trial {self.number(trial_id)}/{self.total} {trial_id} epoch "
            f"{epoch}/{result.get('epochs_planned', self.max_epochs)} {result.get('stage', '')}: "
            f"loss {result.get('train_loss', float('nan')):.4f}  {val}"
            + (f" (mean pose {base:.1f})" if base is not None else "")
            + f"  {result.get('samples_per_s', 0.0):.1f} samples/s"
            + (f"  peak GPU memory {peak / 1e9:.2f} GB" if peak else "")
        )

    def ended(self, trial_id: str, how: str, best_value=None) -> None:
        epochs = self.epochs.get(trial_id, 0)
        self.finished[trial_id] = epochs
        best = f", best val_mpjpe {best_value:.1f} mm" if best_value is not None else ""
        self._print(
            f"{PREFIX} trial {self.number(trial_id)}/{self.total} {trial_id} {how} after "
            f"{epochs} epoch(s){best}"
        )
        self._print(self.progress_line())

    def seconds_left(self) -> float | None:
        """Epochs still to run at the rate epochs have finished so far. A trial not yet finished
        is expected to run as many epochs as the finished ones did on average (early stopping
        included), or all of them while none has finished."""
        elapsed = self.clock() - self.start
        done = sum(self.epochs.values())
        if done == 0:
            return None
        per_trial = (
            (sum(self.finished.values()) / len(self.finished)) if self.finished else self.max_epochs
        )
        running = [t for t in self.epochs if t not in self.finished]
        pending = self.total - len(self.finished) - len(running)
        left = sum(max(per_trial - self.epochs[t], 0.5) for t in running) + pending * per_trial
        return left * elapsed / done

    def progress_line(self) -> str:
        done = len(self.finished)
        running = len([t for t in self.epochs if t not in self.finished])
        best = (
            f"best val_mpjpe {self.best[0]:.1f} mm (trial {self.number(self.best[1])})"
            if self.best
            else "no judged result yet"
        )
        left = self.seconds_left()
        eta = (
            ""
            if done == self.total
            else (f" · about {duration(left)} left" if left is not None else "")
        )
        return (
            f"{PREFIX} sweep {bar(done, self.total)} {done}/{self.total} trials done · "
            f"{running} running · {best} · {duration(self.clock() - self.start)} so far{eta}"
        )


def make_sweep_callback(total_trials: int, max_epochs: int, metric: str, judged, space_names):
    """A Tune callback (runs in the sweep's driver process) that prints the sweep's lines."""
    from ray.tune import Callback

    state = SweepProgressState(total_trials, max_epochs, metric, judged)

    class SweepProgress(Callback):
        def setup(self, **info):
            state.start = state.clock()  # a resumed sweep estimates from its own restart

        def on_trial_start(self, iteration, trials, trial, **info):
            state.started(
                trial.trial_id, {k: v for k, v in (trial.config or {}).items() if k in space_names}
            )

        def on_trial_result(self, iteration, trials, trial, result, **info):
            state.result(trial.trial_id, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            stopped = int(last.get("epoch", 0)) < int(last.get("epochs_planned", max_epochs))
            best = last.get(metric) if judged(last) else None
            state.ended(trial.trial_id, "stopped early" if stopped else "finished", best)

        def on_trial_error(self, iteration, trials, trial, **info):
            where = getattr(trial, "error_file", None) or getattr(trial, "path", None) or ""
            state.ended(trial.trial_id, "FAILED" + (f" (error: {where})" if where else ""))

    return SweepProgress()
