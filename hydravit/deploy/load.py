"""A bounded background CPU load on a schedule: child processes that busy-loop while the load is on.

    with CpuLoad(parse_schedule(['off:10', 'on:15', 'off:10']), procs=2) as load:
        while ...:
            load.update(seconds_since_start)   # starts / stops the children at segment boundaries

The children are always stopped when the ``with`` block ends, also on Ctrl-C or an exception, and
each one exits by itself when its parent process is gone, so no load outlives the benchmark.
"""
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Sequence

# Busy-loops until its parent is gone (re-parented children see another parent pid).
_BUSY_LOOP = 'import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    sum(range(100000))\n'


@dataclass(frozen=True)
class Segment:
    on: bool
    seconds: float


def parse_schedule(items: Sequence[str]) -> List[Segment]:
    """``['off:10', 'on:15', 'off:10']`` -> segments; raises ``ValueError`` naming the bad item."""
    segments = []
    for item in items:
        state, _, seconds = item.partition(':')
        try:
            duration = float(seconds)
        except ValueError:
            duration = -1.
        if state not in ('on', 'off') or not duration > 0:
            raise ValueError(f'each item is on:SECONDS or off:SECONDS with SECONDS > 0, got {item!r}')
        segments.append(Segment(state == 'on', duration))
    if not segments:
        raise ValueError('give at least one segment, e.g. off:10 on:15 off:10')
    return segments


def total_seconds(schedule: Sequence[Segment]) -> float:
    return sum(segment.seconds for segment in schedule)


def load_on(schedule: Sequence[Segment], t: float) -> bool:
    """Whether the load is on ``t`` seconds after the start (off after the schedule ends)."""
    end = 0.
    for segment in schedule:
        end += segment.seconds
        if t < end:
            return segment.on
    return False


def load_windows(schedule: Sequence[Segment]) -> List[tuple]:
    """(start, end) seconds of every on segment."""
    windows, start = [], 0.
    for segment in schedule:
        if segment.on:
            windows.append((start, start + segment.seconds))
        start += segment.seconds
    return windows


class CpuLoad:
    """``procs`` busy-looping child processes while ``schedule`` says on (see the module docstring)."""

    def __init__(self, schedule: Sequence[Segment], procs: int) -> None:
        self.schedule, self.procs = list(schedule), procs
        self.pids: List[int] = []  # every child ever started, for checking that none is left
        self._children: List[subprocess.Popen] = []

    def __enter__(self) -> 'CpuLoad':
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return bool(self._children)

    def update(self, t: float) -> bool:
        """Start or stop the children for time ``t``; returns whether the load is on."""
        on = load_on(self.schedule, t) and self.procs > 0
        if on and not self._children:
            self.start()
        elif not on and self._children:
            self.stop()
        return on

    def start(self) -> None:
        for _ in range(self.procs):
            child = subprocess.Popen([sys.executable, '-c', _BUSY_LOOP], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._children.append(child)
            self.pids.append(child.pid)

    def stop(self) -> None:
        """Terminate and reap every child (killed if it does not exit within a second)."""
        children, self._children = self._children, []
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=1)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
