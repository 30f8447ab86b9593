"""Stored log lines → CloudWatch Logs events → PutLogEvents batches within the service's limits.

PutLogEvents takes at most 10,000 events and 1,048,576 bytes (each event counts its UTF-8
message plus 26 bytes), all within 24 hours and in chronological order. A batch remembers the
LogStore offset after its last line so that shipping can resume exactly there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from openmicrovm.logs.store import LogChunk, split_line

EVENT_OVERHEAD = 26
MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1_048_576
MAX_BATCH_SPAN_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class LogEvent:
    timestamp_ms: int
    message: str
    size: int  # what it counts towards the batch limit
    end_offset: int  # LogStore offset just after this event's line


@dataclass(frozen=True)
class Batch:
    events: list[LogEvent]

    @property
    def end_offset(self) -> int:
        return self.events[-1].end_offset

    def request_events(self) -> list[dict[str, object]]:
        return [{"timestamp": event.timestamp_ms, "message": event.message} for event in self.events]


def events_from(chunk: LogChunk) -> list[LogEvent]:
    events = []
    previous: int | None = None
    for line, end in zip(chunk.lines, chunk.ends, strict=True):
        at, message = split_line(line)
        if at is not None:
            stamp = int(at * 1000)
        else:
            # A line without a timestamp belongs with the one before it.
            stamp = previous if previous is not None else int(time.time() * 1000)
        previous = stamp
        # CloudWatch refuses empty messages; an empty line still marks a place in the output.
        message = message or " "
        events.append(LogEvent(stamp, message, len(message.encode()) + EVENT_OVERHEAD, end))
    return events


def plan_batches(
    events: list[LogEvent], max_events: int = MAX_BATCH_EVENTS, max_bytes: int = MAX_BATCH_BYTES
) -> list[Batch]:
    batches: list[Batch] = []
    current: list[LogEvent] = []
    size = 0
    for event in events:
        if current and (
            len(current) >= max_events
            or size + event.size > max_bytes
            or event.timestamp_ms < current[-1].timestamp_ms
            or event.timestamp_ms - current[0].timestamp_ms > MAX_BATCH_SPAN_MS
        ):
            batches.append(Batch(current))
            current, size = [], 0
        current.append(event)
        size += event.size
    if current:
        batches.append(Batch(current))
    return batches
