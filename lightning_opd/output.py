"""What a person reads while a run works: progress lines with an ETA, and library noise kept out.

`progress_text` is the one format of a progress line ("sft step 100/600  loss 0.81  elapsed 0:00:35
ETA 0:02:55"); `ProgressLines` prints such lines every n steps or every so many seconds (SFT);
`Heartbeat` prints one every few seconds from a thread while a job runs whose steps are too few or
too long to report after each (a validation of one generate call). Only rank 0 prints.

`quiet_library_noise()` is the one place where the libraries' messages that say nothing to a
user of this package are kept off the terminal, each by its message (and category or logger):
a deprecation inside a library calling another, Lightning's eval-mode check (the teacher is in
eval mode on purpose), its "Tip" adverts, the TPU line of a machine without TPUs and the
"stopped: max_steps reached" line of a run that ended normally, transformers' generation-flag
notes (greedy validation of a model whose generation config sets sampling flags), and
transformers' progress bars of loading and saving that finish in under two seconds (tiny models)
or write to a file (a log). It restores everything on exit.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import warnings
from collections.abc import Iterator

# (message regex matched at the start, category): warnings that say nothing to a user of this package
NOISE_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # torch's deprecation of a class that Lightning's own pytree helper still uses
    (re.escape("`isinstance(treespec, LeafSpec)` is deprecated"), FutureWarning),
    # the teacher is frozen in eval mode on purpose (and generate() switches the student's mode)
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning),
)
# deprecations raised inside these libraries by their own calls into another: nothing a user can change
NOISE_DEPRECATION_MODULES = r"(lightning|lightning_fabric|pytorch_lightning|torch|torchmetrics|transformers)(\.|$)"
# Lightning's info lines (lightning_utilities' rank_zero_info logs at whichever of these it was given last)
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                          "lightning_utilities.core.rank_zero")  # fmt: skip
# (loggers, message regex matched at the start) of log records dropped; a logger's filter acts on
# the records created at it, and getLogger gives the library the same logger when it imports later
NOISE_LOG_RECORDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (LIGHTNING_INFO_LOGGERS, re.escape("💡 Tip:")),  # litlogger / litmodels adverts
    (LIGHTNING_INFO_LOGGERS, r"(TPU|HPU) available: False"),  # the GPU line stays: it says where the run runs
    # the normal end (the bar reads step N/N; written past the live bar, it garbles the terminal);
    # other reasons to stop (max_time, a callback) are still reported
    (LIGHTNING_INFO_LOGGERS, re.escape("`Trainer.fit` stopped: `max_steps=") + r"\d+` reached"),
    (("transformers.generation.configuration_utils",),
     re.escape("The following generation flags are not valid and may be ignored")),
)
PROGRESS_BAR_DELAY_S = 2.0  # transformers' load/save bars appear only after this long


def clock(seconds: float) -> str:
    """h:mm:ss, as the training bar shows times."""
    s = max(0, int(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def eta_seconds(elapsed: float, done: int, total: int, start: int = 0) -> float | None:
    """Seconds left at the mean rate of the `done - start` units of the last `elapsed` seconds
    (`start`: units done before timing began, e.g. the steps of a resumed run's checkpoint);
    None before the first unit is done."""
    if done <= start or total <= 0:
        return None
    return elapsed / (done - start) * max(0, total - done)


def progress_text(label: str, done: int, total: int, elapsed: float, extra: str = "", unit: str = "",
                  start: int = 0) -> str:  # fmt: skip
    """'<label> <done>/<total>[ unit][  extra]  elapsed h:mm:ss  ETA h:mm:ss' (ETA -:--:-- before the first)."""
    eta = eta_seconds(elapsed, done, total, start)
    parts = [f"{label} {done}/{total}" + (f" {unit}" if unit else "")]
    if extra:
        parts.append(extra)
    parts += [f"elapsed {clock(elapsed)}", f"ETA {clock(eta) if eta is not None else '-:--:--'}"]
    return "  ".join(parts)


def is_rank_zero() -> bool:
    """Rank 0, as Lightning knows it (from the launcher's environment before the Trainer exists)."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


class ProgressLines:
    """Progress lines printed after every `every_n`-th unit and whenever `every_s` seconds passed
    since the last line; rank 0 only."""

    def __init__(self, label: str, total: int, *, every_n: int = 0, every_s: float = 30.0,
                 indent: str = "", unit: str = "", start: int = 0) -> None:  # fmt: skip
        self.label, self.total, self.every_n, self.every_s = label, total, every_n, every_s
        self.indent, self.unit, self.first = indent, unit, start  # first: units done before timing began
        self.start = self.last = time.monotonic()

    def update(self, done: int, extra: str = "", force: bool = False) -> str | None:
        """The line printed for `done` units finished, or None when none is due."""
        now = time.monotonic()
        every_n = self.every_n and done % self.every_n == 0
        due = force or every_n or (self.every_s and now - self.last >= self.every_s)
        if not due or not is_rank_zero():
            return None
        self.last = now
        line = self.indent + progress_text(self.label, done, self.total, now - self.start, extra, self.unit,
                                           self.first)  # fmt: skip
        print(line, flush=True)
        return line


class Heartbeat:
    """A progress line every `every_s` seconds while the `with` block runs (from a daemon thread);
    set `done` as units finish. Nothing is printed by a block shorter than `every_s`."""

    def __init__(self, label: str, total: int, *, every_s: float = 10.0, unit: str = "", indent: str = "  ") -> None:
        self.label, self.total, self.every_s, self.unit, self.indent = label, total, every_s, unit, indent
        self.done = 0
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            line = self.indent + progress_text(self.label, self.done, self.total, time.monotonic() - self._start,
                                               unit=self.unit)  # fmt: skip
            self.lines.append(line)
            print(line, flush=True)

    def __enter__(self) -> Heartbeat:
        self._start = time.monotonic()
        if self.every_s > 0 and is_rank_zero():
            self._thread = threading.Thread(target=self._run, name="lightning-opd-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _DropRecords(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.match(record.getMessage())
        except Exception:  # a record whose arguments do not format: not ours to drop
            return True


def _quiet_progress_bar(factory, args, kwargs):
    """transformers' tqdm hook: bars show only after PROGRESS_BAR_DELAY_S and only on a terminal."""
    kwargs.setdefault("delay", PROGRESS_BAR_DELAY_S)
    kwargs.setdefault("disable", None)  # tqdm: None = disabled when the output is not a terminal
    return factory(*args, **kwargs)


@contextlib.contextmanager
def quiet_library_noise() -> Iterator[None]:
    """Keep the libraries' messages that say nothing to a user off the terminal while the block
    runs (see the module docstring); warning filters, log filters and the progress-bar hook are
    restored on exit."""
    attached: list[tuple[logging.Logger, logging.Filter]] = []
    previous_hook, set_hook = None, None
    with warnings.catch_warnings():
        for message, category in NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=NOISE_DEPRECATION_MODULES)
        try:
            for names, pattern in NOISE_LOG_RECORDS:
                drop = _DropRecords(pattern)
                for name in names:
                    logger = logging.getLogger(name)
                    logger.addFilter(drop)
                    attached.append((logger, drop))
            from transformers.utils import logging as hf_logging

            set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers >= 5
            if set_hook is not None:
                previous_hook = set_hook(_quiet_progress_bar)
            yield
        finally:
            if set_hook is not None:
                set_hook(previous_hook)
            for logger, drop in attached:
                logger.removeFilter(drop)
