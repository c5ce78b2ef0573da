"""Independent runs side by side: the study's training runs (baselines, fine-tunes) in worker processes.

On a CPU, one training run of these small models does not use more than a core or two well: measured on this 2-core
machine (``benchmarks/train_step.py --threads 1`` twice at once against ``--threads 2`` alone), two single-threaded
runs at once get 1.25× (RNN-T) to 1.3× (Conformer) the work done of one run on both cores. So every run of a stage
that can run on its own goes to one of ``cores // threads`` workers.

Determinism: a run's thread count is its ``TrainConfig.num_threads`` (a profile setting, the same whether the run is
alone, beside others, or resumed), never "whatever cores are free", so the numbers do not depend on how many runs
share the machine. With ``num_threads=None`` (all cores, e.g. on a GPU machine) runs go one at a time, in this
process.

Workers are spawned, not forked: a fork of a Jupyter kernel (its ZMQ threads) or of a process whose OpenMP pool has
started is not safe. Each worker receives the shared context (the prepared data: features, tokenizer, CMVN) once,
through shared memory as torch's DataLoader workers do, then takes job after job. A job writes its results to disk
(checkpoints, cached hypotheses), so the caller reads them afterwards the way it reads any finished run. A job that
fails stops the call with the job named: queued jobs are dropped, running ones finish first (their work is kept, as
any finished run's is).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

import torch


def parallel_workers(num_threads: int | None) -> int:
    """How many runs of ``num_threads`` threads each go side by side here: one per ``num_threads`` cores; one when
    runs take every core (``None``) or CUDA is present (one device, and the GPU is the bottleneck)."""
    if num_threads is None or torch.cuda.is_available():
        return 1
    return max(1, (os.cpu_count() or 1) // num_threads)


def run_side_by_side(
    job: Callable[..., Any], context: Any, args: Sequence[tuple], labels: Sequence[str], num_threads: int | None
) -> None:
    """``job(context, *a)`` for every ``a`` in ``args``, started in the order given (put the longest first), on
    :func:`parallel_workers` processes; in this process, one after the other, when that is one.

    ``job`` must be a module-level function (a spawned worker imports it) that leaves its results on disk;
    ``context`` is what every job shares (sent to each worker once). ``labels`` name the jobs in the progress lines
    and, as a note on its exception, a failed one."""
    if len(args) != len(labels):
        raise ValueError(f"run_side_by_side: {len(args)} jobs but {len(labels)} labels")
    workers = min(parallel_workers(num_threads), len(args))
    if workers <= 1:
        for a, label in zip(args, labels):
            try:
                job(context, *a)
            except Exception as error:
                error.add_note(f"in run {label}")
                raise
        return
    start = time.perf_counter()
    print(f"{len(args)} runs, {workers} at a time ({num_threads} thread(s) each)", flush=True)
    with _thread_limits(num_threads), ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(context, num_threads)) as executor:
        futures = {executor.submit(_run_job, job, *a): label for a, label in zip(args, labels)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                error = future.exception()
                if error is not None:  # the worker's exception itself, its traceback attached as the cause
                    executor.shutdown(cancel_futures=True)
                    error.add_note(f"in run {futures[future]} (in a worker process)")
                    raise error
                finished = len(futures) - len(pending)
                print(f"  [{finished}/{len(futures)}] {futures[future]} done "
                      f"({(time.perf_counter() - start) / 60:.1f} min)", flush=True)


# Read once, when a worker imports NumPy (OpenBLAS) or torch: without them every worker starts a BLAS thread per core,
# which spins beside the worker's own thread (measured in 06's NumPy integer decodes: a second thread at ~50% CPU in
# each worker, half of the machine's time spent in the kernel).
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextmanager
def _thread_limits(num_threads: int) -> Iterator[None]:
    """The environment the spawned workers inherit: every thread pool at ``num_threads``."""
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update({name: str(num_threads) for name in _THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_worker_context: Any = None  # in a worker process: the context its jobs share


def _start_worker(context: Any, num_threads: int) -> None:
    global _worker_context
    _worker_context = context
    torch.set_num_threads(num_threads)


def _run_job(job: Callable[..., Any], *args: Any) -> None:
    job(_worker_context, *args)
