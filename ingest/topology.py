"""Topology: a description of a pipeline's stages, like `Broadway.topology/1`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StageGroup:
    """A group of identical stages: its name, its worker names and how many run."""

    name: str
    concurrency: int
    workers: tuple[str, ...]
    details: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Topology:
    pipeline: str
    producer: StageGroup
    processors: StageGroup
    batchers: tuple[StageGroup, ...]

    def render(self) -> str:
        """A text picture of the pipeline, for `ingest topology`."""
        lines = [self.pipeline, f"├─ producer {self.producer.name} {_describe(self.producer)}"]
        branch = "├─" if self.batchers else "└─"
        lines.append(f"{branch} processors {_describe(self.processors)}")
        for index, batcher in enumerate(self.batchers):
            branch = "└─" if index == len(self.batchers) - 1 else "├─"
            lines.append(f"{branch} batcher {batcher.name!r} {_describe(batcher)}")
        return "\n".join(lines)


def _describe(group: StageGroup) -> str:
    details = "".join(f", {key}={value}" for key, value in group.details.items())
    return f"(concurrency={group.concurrency}{details})"
