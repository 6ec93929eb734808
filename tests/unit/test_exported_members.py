"""The package exports exactly its public names, sorted."""

from __future__ import annotations

import pytest

import ingest
import ingest.waiting


def test_all_lists_every_public_name_and_only_those() -> None:
    public = {name for name in vars(ingest) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(ingest, name)).__name__ == "module"}
    assert set(ingest.__all__) == public - modules


def test_all_is_sorted_constants_then_classes_then_functions() -> None:
    def kind(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert list(ingest.__all__) == sorted(ingest.__all__, key=kind)


@pytest.mark.parametrize("name", ["first_of", "close_within"])
def test_the_bounded_waits_are_public_with_a_usage_example(name: str) -> None:
    exported = getattr(ingest, name)
    assert exported is getattr(ingest.waiting, name)
    assert "::" in (exported.__doc__ or "")
    assert ingest.CLOSE_TIMEOUT_S == ingest.waiting.CLOSE_TIMEOUT_S
