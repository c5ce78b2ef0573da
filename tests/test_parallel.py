"""Runs side by side (sub8.parallel, sub8.qat.finetune_rows): every job runs once with its thread count, a failure
raises the job's own exception with the job named, and a fine-tune gives the same weights beside another as alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_qat import FINETUNE_STEPS, data  # noqa: F401  (the fixture)

from sub8.experiment import model_dir
from sub8.io import load_checkpoint
from sub8.parallel import parallel_workers, run_side_by_side
from sub8.qat import FineTune, finetune_row, finetune_rows, s8bqat_options
from sub8.quant import QuantPlan


def record_worker(out_dir: str, label: str) -> None:
    """A job: note which process ran it, with how many threads, and what it shares."""
    Path(out_dir, f"{label}.json").write_text(json.dumps({"pid": os.getpid(), "threads": torch.get_num_threads(),
                                                          "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}))


def failing_job(out_dir: str, label: str) -> None:
    if label == "bad":
        raise ValueError("this job is broken")
    record_worker(out_dir, label)


def test_parallel_workers_is_one_per_thread_budget_and_one_when_runs_take_every_core():
    cores = os.cpu_count() or 1
    assert parallel_workers(1) == (1 if torch.cuda.is_available() else cores)
    assert parallel_workers(None) == 1
    assert parallel_workers(cores * 4) == 1


def test_every_job_runs_once_with_the_threads_asked(tmp_path):
    labels = [f"job{i}" for i in range(5)]
    blas_before = os.environ.get("OPENBLAS_NUM_THREADS")
    run_side_by_side(record_worker, str(tmp_path), [(label,) for label in labels], labels, num_threads=1)
    ran = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert sorted(ran) == labels
    assert all(r["threads"] == 1 for r in ran.values())
    if parallel_workers(1) > 1:  # in worker processes, not in this one, whose BLAS pools are one thread too
        assert os.getpid() not in {r["pid"] for r in ran.values()}
        assert all(r["blas_threads"] == "1" for r in ran.values())
    assert os.environ.get("OPENBLAS_NUM_THREADS") == blas_before  # this process's environment is left as it was


@pytest.mark.parametrize("jobs", [1, 3])  # alone: in this process; beside others: in a worker
def test_a_failed_job_stops_the_call_with_its_exception_and_its_name(tmp_path, jobs):
    labels = ["bad", *(f"job{i}" for i in range(jobs - 1))]
    with pytest.raises(ValueError, match="this job is broken") as failure:
        run_side_by_side(failing_job, str(tmp_path), [(label,) for label in labels], labels, num_threads=1)
    assert any(note.startswith("in run bad") for note in failure.value.__notes__)


def test_fine_tunes_side_by_side_equal_the_same_fine_tunes_one_at_a_time(data):  # noqa: F811
    jobs = [FineTune("base", "s8bqat", QuantPlan.uniform(3), s8bqat_options(FINETUNE_STEPS)),
            FineTune("base", "uniform", QuantPlan.uniform(4)), FineTune("base", "fp32_control"),
            FineTune("base", "uniform", QuantPlan.uniform(4))]  # twice: runs once
    side_by_side = finetune_rows(data, jobs)
    assert [r.name for r in side_by_side] == [job.name for job in jobs]
    weights = {job.name: load_checkpoint(model_dir(data.profile, job.name) / "final.pt")["model"] for job in jobs}
    for job, row in zip(jobs[:3], side_by_side):
        alone = finetune_row(data, job.base, job.method, job.plan, job.options, force=True)  # in this process
        same = {k: v for k, v in alone.row.items() if k != "finetune_minutes"}
        assert same == {k: v for k, v in row.row.items() if k != "finetune_minutes"}
        again = load_checkpoint(model_dir(data.profile, job.name) / "final.pt")["model"]
        assert all(torch.equal(again[k], weights[job.name][k]) for k in again)
