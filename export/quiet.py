"""Quiet by default: what the export stage shows while it works.

Lowering and converting go through libraries that talk a lot (the ONNX optimiser logs every initializer it
merges, coremltools every op it converts, the ExecuTorch runtime its CPU probing from C++). Unless the
``mobile_vmoe`` logger is at DEBUG (``mobile-vmoe -v``), ``quiet_libraries`` keeps their loggers and warnings
below ERROR silent and ``captured_output`` holds a call's own prints (shown only when the call fails).
Long steps report through ``Progress``: a tqdm bar on a terminal, a plain log line per stage otherwise.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

__all__ = ["Progress", "captured_output", "quiet_libraries", "verbose"]

log = logging.getLogger("mobile_vmoe.export")

# The loggers of the libraries export drives. Child loggers (onnx_ir.passes..., torch.export...) inherit the level.
LIBRARY_LOGGERS = ("onnx_ir", "onnxscript", "onnx", "torch", "torchao", "executorch", "coremltools")


def verbose() -> bool:
    """Library chatter wanted: the ``mobile_vmoe`` logger is at DEBUG (the CLI's ``-v``)."""
    return logging.getLogger("mobile_vmoe").isEnabledFor(logging.DEBUG)


class _BelowError(logging.Filter):
    """On the root logger: drops records that libraries log on it directly (``logging.warning(...)``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Library loggers at ERROR and Python warnings off while the context is open, unless ``verbose()``."""
    if verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    levels = [lg.level for lg in loggers]
    root, below_error = logging.getLogger(), _BelowError()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    root.addFilter(below_error)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(below_error)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def captured_output() -> Iterator[None]:
    """What a library call prints (Python and C level, stdout and stderr) is held back, unless ``verbose()``;
    it is written to stderr when the call raises, so that a failure keeps its context."""
    if verbose():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    text = io.StringIO()
    with tempfile.TemporaryFile() as raw:
        saved = _redirect_fds(raw.fileno())
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        except BaseException:
            _restore_fds(saved)
            saved = []
            raw.seek(0)
            sys.stderr.write(raw.read().decode(errors="replace") + text.getvalue())
            raise
        finally:
            _restore_fds(saved)


def _redirect_fds(target: int) -> list[tuple[int, int]]:
    saved = []
    for fd in (1, 2):
        try:
            saved.append((fd, os.dup(fd)))
            os.dup2(target, fd)
        except OSError:  # no such descriptor (an embedded interpreter): Python-level capture only
            continue
    return saved


def _restore_fds(saved: list[tuple[int, int]]) -> None:
    for fd, copy in saved:
        os.dup2(copy, fd)
        os.close(copy)


class Progress:
    """A long task in steps: a tqdm bar on a terminal, one log line per stage otherwise.

    with Progress("lowering", total=3) as p:
        p.stage("export"); ...; p.advance()
    """

    def __init__(self, desc: str, total: int = 0, unit: str = "step") -> None:
        self.desc = desc
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        else:
            log.info("%s ...", desc)

    def stage(self, name: str) -> None:
        """A new stage begins (shown beside the bar, or logged)."""
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        else:
            log.info("%s: %s", self.desc, name)

    def add_total(self, n: int) -> None:
        """n more steps than announced (known only once the task is under way)."""
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + n
            self.bar.refresh()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
