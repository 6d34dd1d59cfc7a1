"""Jobs of the service and the queue they wait in, on rank 0; HTTP threads and the worker share them.

The queue is bounded (a full one is answered 503, not left to grow), stops accepting on shutdown
while the worker drains what it holds, and keeps the last `KEPT` jobs so clients can fetch results.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

KEPT = 1000


class Rejected(Exception):
    """The queue takes no job now: full (`retry` True) or shutting down / unhealthy."""

    def __init__(self, reason: str, retry: bool):
        super().__init__(reason)
        self.retry = retry


@dataclass
class Job:
    """One request (a `GenerateRequest`) and `config`, the app config it generates with."""

    request: Any
    config: Any
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "queued"
    steps_done: int = 0
    error: Optional[str] = None
    result: Optional[bytes] = None
    submitted: float = field(default_factory=time.perf_counter)
    latency_s: Optional[float] = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _waiters: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def status(self) -> dict:
        """The JSON of GET /jobs/{id}."""
        return {"id": self.id, "state": self.state, "steps_done": self.steps_done,
                "steps": self.config.sampler.steps, "error": self.error, "latency_s": self.latency_s}

    def finish(self, result: Optional[bytes], error: Optional[str] = None) -> None:
        """Done with `result`, or failed with `error`; wakes whoever waits."""
        with self._lock:
            self.result, self.error = result, error
            self.latency_s = time.perf_counter() - self.submitted
            self.state = "failed" if error is not None else "done"
            waiters, self._waiters = self._waiters, []
        for notify in waiters:
            notify()

    def when_finished(self, notify: Callable[[], None]) -> None:
        """Call `notify()` (from the thread that finishes the job) once it is done or failed."""
        with self._lock:
            if not self.finished:
                self._waiters.append(notify)
                return
        notify()


class JobQueue:
    """FIFO of at most `capacity` waiting jobs, and the jobs kept for lookup by id."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._closed: Optional[str] = None
        self.unhealthy: Optional[str] = None

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

    def submit(self, job: Job) -> Job:
        """Queue `job`, or raise `Rejected`."""
        with self._cond:
            if self._closed is not None:
                raise Rejected(self._closed, retry=False)
            if len(self._waiting) >= self.capacity:
                raise Rejected(f"the queue is full ({self.capacity} jobs wait)", retry=True)
            self._waiting.append(job)
            self._jobs[job.id] = job
            while len(self._jobs) > KEPT and next(iter(self._jobs.values())).finished:
                self._jobs.popitem(last=False)
            self._cond.notify()
        return job

    def get(self, job_id: str) -> Optional[Job]:
        with self._cond:
            return self._jobs.get(job_id)

    def next(self, timeout: float) -> Optional[Job]:
        """The oldest waiting job, now running; None if none came within `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._waiting, timeout):
                return None
            job = self._waiting.popleft()
            job.state = "running"
            return job

    @property
    def drained(self) -> bool:
        """Closed and empty: the worker may stop."""
        with self._cond:
            return self._closed is not None and not self._waiting

    def close(self, reason: str) -> None:
        """Accept no more jobs (those waiting still run)."""
        with self._cond:
            if self._closed is None:
                self._closed = reason
            self._cond.notify_all()

    def fail_all(self, reason: str) -> None:
        """Unhealthy: close, and fail every job not finished (the ranks can no longer run them)."""
        self.unhealthy = reason
        self.close(reason)
        with self._cond:
            pending = [job for job in self._jobs.values() if not job.finished]
            self._waiting.clear()
        for job in pending:
            job.finish(None, f"the service is unhealthy: {reason}")
