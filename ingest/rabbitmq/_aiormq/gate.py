"""The fast path's one version gate: whether the installed aiormq and pamqp are those it was
written for, with every internal of `internals.INTERNALS` where it expects it."""

from __future__ import annotations

import functools
import importlib.metadata
import re
from typing import Any, TypeGuard

import aiormq
import structlog

from ingest.rabbitmq._aiormq import decoding
from ingest.rabbitmq._aiormq.internals import ON_CLASSES

logger = structlog.get_logger("ingest.rabbitmq")

# Written against aiormq 7.2 and pamqp 4 (tested with aiormq 7.2.4 and pamqp 4.0.1): aiormq
# 7.0 and 7.1 raise other exceptions from their reader, and aiormq 7.2 requires pamqp 4.
AIORMQ_SERIES = (7, 2)
PAMQP_SERIES = (4,)
_reported: set[str] = set()


@functools.cache
def _version(distribution: str) -> str:
    """The installed version of `distribution`, read once (tests replace this function)."""
    return importlib.metadata.version(distribution)


def _problem() -> str | None:
    """Why the fast path does not fit the installed aiormq and pamqp, or None."""
    for distribution, series in (("aiormq", AIORMQ_SERIES), ("pamqp", PAMQP_SERIES)):
        try:
            version = _version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return f"{distribution}'s version is unknown (no package metadata)"
        parts = re.match(r"(\d+)\.(\d+)", version)
        found = tuple(int(part) for part in parts.groups()) if parts else ()
        if found[: len(series)] != series:
            expected = ".".join(map(str, series))
            return f"{distribution} {version} is installed; it was written for {expected}.x"
    if decoding.LAYOUT_PROBLEM is not None:
        return f"pamqp's Basic class has changed: {decoding.LAYOUT_PROBLEM}"
    for internal in ON_CLASSES:
        owner: Any = aiormq
        for name in internal.owner.split("."):
            owner = getattr(owner, name, None)
        found_there = getattr(owner, internal.name, None)
        if internal.kind == "property":
            present = isinstance(found_there, property)
        else:
            present = callable(found_there)
        if not present:
            return f"aiormq.{internal.owner}.{internal.name} is gone"
    return None


def usable() -> bool:
    """Whether the installed aiormq and pamqp are those this was written for. If not, says
    why in one log line (once per reason) and the connector uses plain aiormq."""
    problem = _problem()
    if problem is None:
        return True
    refuse(problem)
    return False


def refuse(reason: str) -> None:
    """Say once, for `reason`, that the fast path is not used."""
    if reason not in _reported:
        _reported.add(reason)
        logger.warning("aiormq fast path not used; plain aiormq instead", reason=reason)


def fits(channel: object, attributes: tuple[tuple[str, type], ...]) -> TypeGuard[aiormq.Channel]:
    """Whether the fast path may take `channel` over: an aiormq Channel, `usable()`, and
    holding each of `attributes` (name, type: from `internals`); if not, says why, as
    `usable` does."""
    if not isinstance(channel, aiormq.Channel) or not usable():
        return False
    for name, kind in attributes:
        if not isinstance(getattr(channel, name, None), kind):
            refuse(f"aiormq's Channel has no {name} {kind.__name__}")
            return False
    return True
