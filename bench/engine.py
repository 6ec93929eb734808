"""Engine benchmark: 200,000 messages through the in-memory producer.

Scenarios (each in its own process, so peak RSS is its own):
  processors_only               handle_message only, acknowledged by the processors
  three_batchers_dynamic_keys   routed to batchers cinema / musical / default, 10 batch keys each

Timing runs from the first push until every message is acknowledged, the pipeline
having been stopped after the last push (so the last incomplete batches are flushed rather
than waited for). Prints one JSON line per scenario; uses uvloop when it is installed.

    python bench/engine.py [--messages N] [--scenario NAME] [--no-uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from ingest import Batcher, BatchInfo, Handlers, InMemoryProducer, Message, Pipeline, Processors

SCENARIOS = ("processors_only", "three_batchers_dynamic_keys")
EVENTS = ("cinema", "musical", "default")
PUSH_SLICE = 1_000


class CountingAcknowledger:
    """Counts acknowledged messages and says when all arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.successful = 0
        self.failed = 0
        self.done = asyncio.Event()

    async def ack(self, successful: list[Message], failed: list[Message]) -> None:
        self.successful += len(successful)
        self.failed += len(failed)
        if self.successful + self.failed >= self.expected:
            self.done.set()

    def configure(self, ack_data: Any, options: Mapping[str, Any]) -> Any:
        return ack_data


class NoOp(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message


class Routed(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        event, user_id = message.data
        message.batcher = event
        message.batch_key = user_id
        return message

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        return messages


def build(scenario: str) -> Pipeline:
    processors = Processors(concurrency=2, max_demand=100)
    if scenario == "processors_only":
        return Pipeline("bench", NoOp(), InMemoryProducer(), processors=processors)
    batchers = {event: Batcher(batch_size=100, batch_timeout=1.0) for event in EVENTS}
    return Pipeline("bench", Routed(), InMemoryProducer(), processors=processors, batchers=batchers)


async def run(scenario: str, count: int) -> dict[str, Any]:
    pipeline = build(scenario)
    acknowledger = CountingAcknowledger(count)
    producer = pipeline.producer
    assert isinstance(producer, InMemoryProducer)
    await pipeline.start()
    cpu_started = time.process_time()
    started = time.perf_counter()
    for offset in range(0, count, PUSH_SLICE):
        await producer.push(
            [
                Message((EVENTS[i % 3], i % 10), acknowledger)
                for i in range(offset, min(count, offset + PUSH_SLICE))
            ]
        )
    # Draining flushes the last, incomplete batches instead of waiting for their timeout.
    await pipeline.stop()
    await acknowledger.done.wait()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return {
        "scenario": scenario,
        "messages": count,
        "successful": acknowledger.successful,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(count / elapsed),
        "cpu_s": round(cpu, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--scenario", choices=SCENARIOS)
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own loop")
    args = parser.parse_args()
    if args.scenario is None:
        for scenario in SCENARIOS:
            command = [
                sys.executable,
                __file__,
                "--scenario",
                scenario,
                "--messages",
                str(args.messages),
            ]
            if args.no_uvloop:
                command.append("--no-uvloop")
            subprocess.run(command, check=True)
        return
    runner: Any = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            runner = uvloop.run
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    print(json.dumps(runner(run(args.scenario, args.messages))), flush=True)


if __name__ == "__main__":
    main()
