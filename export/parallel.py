"""Several exports side by side, one per worker process (the pipeline's export stage).

Lowering is mostly single-threaded Python (tracing, partitioning, serialisation), so on a 2-core machine two
artifacts exported at once take about half the wall time of one after the other. Each worker is a fresh
("spawn") process that splits the cores with the others; results come back as they finish.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, NamedTuple

from .core import export_model
from .verify import VerificationError

__all__ = ["ExportJob", "export_many"]

# Longest first, so that the last job to finish is a short one (measured on the demo models: an int8 .pte
# lowers in ~1.2x the time of an fp32 one, ONNX and Core ML in a fraction of it).
_COST = {("pte", "int8"): 4, ("pte", "int8-static"): 4, ("pte", None): 3, ("onnx", None): 2}


class ExportJob(NamedTuple):
    """One artifact: ``export_model(fmt, out, **kwargs)``."""

    fmt: str
    out: str
    kwargs: dict[str, Any]

    @property
    def cost(self) -> int:
        return _COST.get((self.fmt, self.kwargs.get("quantize")), 1)


class ExportDone(NamedTuple):
    job: ExportJob
    error: VerificationError | None  # the artifact failed verification (nothing written); other errors raise


def _run(job: ExportJob) -> ExportDone:
    try:
        export_model(job.fmt, job.out, **job.kwargs)
    except VerificationError as e:
        return ExportDone(job, e)
    return ExportDone(job, None)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # workers share the cores instead of each taking all of them


def export_many(jobs: Sequence[ExportJob], workers: int = 2) -> Iterator[ExportDone]:
    """Run ``jobs`` in ``workers`` processes (1: in this process, in order), yielding each as it finishes."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _run(job)
        return
    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch / executorch state
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(_run, j) for j in sorted(jobs, key=lambda j: -j.cost)]
        try:
            for f in as_completed(futures):
                yield f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
