"""The executor: runs a merge's jobs on worker threads under a memory budget, with progress.

Jobs run concurrently while their declared working memory fits: at least the largest alone, and as many
streamed jobs (whose cost is a few blocks) as there are workers. The first failure stops submission; the error
of the earliest failed job is raised once the pool has drained.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from omnimerge.plan import Job


class Budget:
    """Bounds the working memory of jobs in flight (a job larger than the limit runs alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        with self.cond:
            while self.used and self.used + n > self.limit:
                self.cond.wait()
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


class Notes:
    """One-line notes for the user, each distinct text passed to ``echo`` once (thread-safe)."""

    def __init__(self, echo: Callable[[str], None] | None) -> None:
        self.seen: dict[str, None] = {}
        self.echo = echo
        self.lock = threading.Lock()

    def __call__(self, msg: str) -> None:
        with self.lock:
            if msg in self.seen:
                return
            self.seen[msg] = None
        if self.echo:
            self.echo(msg)


def execute(jobs: Sequence[Job], run_job: Callable[[Job], None], *, workers: int,
            prefetch: Callable[[Job], None] | None = None, progress: bool = False) -> None:
    """Run ``run_job`` for every job, ``workers`` at a time, under the memory budget of their costs."""
    streamed = sorted((j.cost for j in jobs if j.streaming), reverse=True)[:workers]
    limit = max([j.cost for j in jobs] + [sum(streamed), 1])
    budget = Budget(limit)
    total_bytes = sum(j.meta.nbytes for j in jobs) or 1
    prog = None
    task = None
    if progress:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        prog = Progress(
            TextColumn("[bold]merging[/] {task.fields[tensors]}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )
        prog.start()
        task = prog.add_task("merge", total=total_bytes, tensors=f"0/{len(jobs)} tensors")
    done = [0]
    lock = threading.Lock()
    # the block loops allocate many short-lived tensors: cyclic GC passes over the heap cost ~5% and free
    # nothing (tensors are freed by reference counting); collection resumes after the stream
    gc_was_enabled = gc.isenabled()
    gc.disable()

    def one(job: Job, reserved: int) -> None:
        try:
            run_job(job)
        finally:
            budget.release(reserved)
            if prog is not None and task is not None:
                with lock:
                    done[0] += 1
                    prog.update(task, advance=job.meta.nbytes, tensors=f"{done[0]}/{len(jobs)} tensors")

    try:
        if workers <= 1:
            for job in jobs:
                one(job, budget.acquire(job.cost))
            return
        failed = threading.Event()

        def guarded(job: Job, reserved: int) -> None:
            try:
                one(job, reserved)
            except BaseException:
                failed.set()
                raise

        futures: list[Future[None]] = []
        with ThreadPoolExecutor(workers, thread_name_prefix="omnimerge") as pool:
            for job in jobs:
                if failed.is_set():  # stop submitting; jobs not started yet are cancelled below
                    break
                reserved = budget.acquire(job.cost)
                if prefetch is not None:
                    prefetch(job)
                futures.append(pool.submit(guarded, job, reserved))
            if failed.is_set():
                for f in futures:
                    f.cancel()
        # the pool has drained: raise the error of the earliest job that failed
        for f in futures:
            if not f.cancelled() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
    finally:
        if gc_was_enabled:
            gc.enable()
        if prog is not None:
            prog.stop()
