"""The scheduler's queue of requests waiting for admission (new or preempted)."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator

from vserve.core.request import Request


class WaitingQueue:
    """Waiting requests in scheduling order: FCFS, or ``(priority, arrival_time)``.

    In FCFS order ``push_front`` puts a preempted request before everything else; under the
    priority policy a preempted request simply goes back to its place by key.
    """

    def __init__(self, policy: str) -> None:
        self._priority = policy == "priority"
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._seq = itertools.count()  # ties broken by insertion, never by comparing Requests

    def __len__(self) -> int:
        return len(self._heap) if self._priority else len(self._fifo)

    def __iter__(self) -> Iterator[Request]:
        """In scheduling order under FCFS; in no particular order under priority."""
        if self._priority:
            return iter([e[3] for e in self._heap])
        return iter(self._fifo)

    def push(self, request: Request) -> None:
        if self._priority:
            entry = (request.priority, request.arrival_time, next(self._seq), request)
            heapq.heappush(self._heap, entry)
        else:
            self._fifo.append(request)

    def push_front(self, request: Request) -> None:
        if self._priority:
            self.push(request)
        else:
            self._fifo.appendleft(request)

    def peek(self) -> Request:
        return self._heap[0][3] if self._priority else self._fifo[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3] if self._priority else self._fifo.popleft()

    def remove(self, request: Request) -> None:
        """O(n); aborts are rare next to scheduling."""
        if self._priority:
            self._heap = [e for e in self._heap if e[3] is not request]
            heapq.heapify(self._heap)
        else:
            self._fifo.remove(request)
