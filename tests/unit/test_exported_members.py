"""Each package exports exactly its public names, sorted: the engine (`ingest`) and the
connector (`ingest.rabbitmq`)."""

from __future__ import annotations

from types import ModuleType

import pytest

import ingest
import ingest.rabbitmq
import ingest.waiting

PACKAGES = [ingest, ingest.rabbitmq]


@pytest.mark.parametrize("package", PACKAGES, ids=lambda package: package.__name__)
def test_all_lists_every_public_name_and_only_those(package: ModuleType) -> None:
    public = {name for name in vars(package) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(package, name)).__name__ == "module"}
    assert set(package.__all__) == public - modules


@pytest.mark.parametrize("package", PACKAGES, ids=lambda package: package.__name__)
def test_all_is_sorted_constants_then_classes_then_functions(package: ModuleType) -> None:
    def kind(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert list(package.__all__) == sorted(package.__all__, key=kind)


@pytest.mark.parametrize("name", ["first_of", "close_within"])
def test_the_bounded_waits_are_public_with_a_usage_example(name: str) -> None:
    exported = getattr(ingest, name)
    assert exported is getattr(ingest.waiting, name)
    assert "::" in (exported.__doc__ or "")
    assert ingest.CLOSE_TIMEOUT_S == ingest.waiting.CLOSE_TIMEOUT_S
