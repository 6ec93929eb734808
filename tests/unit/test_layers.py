"""The layers stay visible: the engine (`ingest`) imports neither the connector
(`ingest.rabbitmq`) nor the service (`ingest.service`), nor the SQL window store
(`ingest.sql`) or SQLAlchemy; the connector does not import the service; the SQL store
imports only the engine (never the connector or the service); nothing under `ingest/`
imports the hosted `pipelines`. Checked on the source, so an import inside a function
counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ingest

PACKAGE = Path(ingest.__file__).parent

# For each layer, the packages its modules must not import.
FORBIDDEN = {
    "engine": ("ingest.rabbitmq", "ingest.service", "ingest.sql", "sqlalchemy", "pipelines"),
    "connector": ("ingest.service", "pipelines"),
    "sql": ("ingest.rabbitmq", "ingest.service", "pipelines"),
    "service": ("pipelines",),
}


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    # `python -m ingest` is the command line: the service's.
    return {
        "rabbitmq": "connector",
        "service": "service",
        "sql": "sql",
        "__main__.py": "service",
    }.get(parts[0], "engine")


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_a_module_imports_nothing_from_a_higher_layer(path: Path) -> None:
    layer = layer_of(path)
    wrong = [
        name
        for name in imported_modules(path)
        for forbidden in FORBIDDEN[layer]
        if name == forbidden or name.startswith(f"{forbidden}.")
    ]
    assert wrong == [], f"{layer} module {path.name} imports {wrong}"


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from ingest.service.settings import Settings\n")
    assert "ingest.service.settings" in imported_modules(module)


def test_no_module_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in MODULES
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}
