"""The layers stay visible: the engine (`ingest`) imports neither the connector
(`ingest.rabbitmq`) nor the service (`ingest.service`), nor the SQL window store
(`ingest.sql`) or SQLAlchemy; the connector does not import the service; the SQL store
imports only the engine (never the connector or the service); nothing under `ingest/`
imports the hosted `pipelines`. Checked on the source, so an import inside a function
counts too.

Over `ingest/` and `pipelines/`, the size and privacy rules (DESIGN.md §2, STYLE.md):
- a function or method is at most 60 lines of code: its lines from `def` to its end
  that hold code, so neither blank lines, comments nor docstrings count (they say why, and
  are never cut to fit a limit); a nested function counts in the one holding it too;
- nothing imports another package's private module (a private package, such as
  `ingest.rabbitmq._aiormq`, belongs to its parent: `ingest.rabbitmq`), imports a private
  name of another module, or reaches `module._name` on a module it imported;
- a module over 400 lines of code (counted the same way) is a warning, not a failure:
  size follows cohesion.
Each has an allow-list with a reason per entry, which fails when an entry is stale."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
import warnings
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


def test_the_framework_imports_without_the_sql_extra() -> None:
    """Installed without the `sql` or `tickets` extra, the engine, the connector and the
    service import: SQLAlchemy, aiosqlite and asyncpg are the SQL store's and the app's."""
    blocked = ("sqlalchemy", "aiosqlite", "asyncpg")
    modules = ("ingest", "ingest.testing", "ingest.rabbitmq", "ingest.service.cli")
    code = "; ".join(
        [
            "import sys",
            *(f"sys.modules[{name!r}] = None" for name in blocked),
            *(f"import {module}" for module in modules),
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from ingest.service.settings import Settings\n")
    assert "ingest.service.settings" in imported_modules(module)


# The size and privacy rules of DESIGN.md §2 and STYLE.md, over `ingest/` and `pipelines/`.

ROOT = PACKAGE.parent
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")])
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400

# Functions (and methods) longer than MAX_FUNCTION_LINES lines of code, by qualified name,
# with why each is allowed for now. An entry that no longer exceeds (or no longer exists)
# fails `test_every_long_function_allowed_is_still_long`: the list cannot go stale.
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}

# Imports of another package's private module, and `module._name` reaches across modules,
# as "importing module: what it reaches", with why each is allowed for now; kept current by
# `test_every_private_reach_allowed_is_still_made`.
PRIVATE_REACHES_ALLOWED: dict[str, str] = {}


def dotted_name(path: Path, root: Path = ROOT) -> str:
    """`ingest/rabbitmq/_aiormq/reader.py` -> `ingest.rabbitmq._aiormq.reader`; a package's
    `__init__.py` is the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_first_party_module(dotted: str, root: Path = ROOT) -> bool:
    """Whether `dotted` is a module or package under `root`, not a name inside a module."""
    base = root.joinpath(*dotted.split("."))
    return (base / "__init__.py").is_file() or base.with_suffix(".py").is_file()


def owner_of(path: Path, root: Path = ROOT) -> str:
    """The package whose private modules `path` may import: the one it is in, where a
    private package (and all it holds) counts as part of its parent."""
    parts = dotted_name(path, root).split(".")
    if path.name != "__init__.py":
        parts = parts[:-1]
    first_private = next((i for i, part in enumerate(parts) if is_private(part)), len(parts))
    return ".".join(parts[:first_private])


def code_lines(path: Path) -> set[int]:
    """The line numbers of `path` that hold code: not blank, not only a comment, not part
    of a docstring (a docstring or comment says why; it is never cut to fit a limit)."""
    source = path.read_text()
    lines: set[int] = set()
    skipped = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT}
    skipped |= {tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skipped:
            lines.update(range(token.start[0], token.end[0] + 1))
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines.difference_update(range(first.lineno, (first.end_lineno or 0) + 1))
    return lines


def function_lengths(path: Path, root: Path = ROOT) -> dict[str, int]:
    """Every function and method of `path` by qualified name (`module.Class.method`,
    `module.outer.inner`), with its lines of code (see `code_lines`), decorators aside; a
    nested function counts in its own length and in that of the function holding it."""
    code = code_lines(path)
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    span = range(child.lineno, (child.end_lineno or child.lineno) + 1)
                    lengths[name] = len(code.intersection(span))
                visit(child, name)
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), str(path)), dotted_name(path, root))
    return lengths


def long_functions(paths: list[Path], root: Path = ROOT) -> dict[str, int]:
    return {
        name: length
        for path in paths
        for name, length in function_lengths(path, root).items()
        if length > MAX_FUNCTION_LINES
    }


def private_reaches(path: Path, root: Path = ROOT) -> set[str]:
    """What `path` reaches that is private elsewhere, as "its module: what": an import of
    another package's private module (see `owner_of`), a private name imported from
    another module, and `module._name` on a module it imported."""
    tree = ast.parse(path.read_text(), str(path))
    here = dotted_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    owner = owner_of(path, root)
    reached: set[str] = set()
    modules: dict[str, str] = {}  # a local name -> the module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                reached |= _private_to_another_package(alias.name, owner)
                bound = alias.name if alias.asname else alias.name.partition(".")[0]
                modules[alias.asname or bound] = bound
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up `level - 1` packages
                anchor = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                reached |= _private_to_another_package(full, owner)
                is_module = is_first_party_module(full, root) or full in sys.modules
                if is_module:
                    modules[alias.asname or alias.name] = full
                elif is_private(alias.name):
                    reached.add(full)  # a private name of another module
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and is_private(node.attr)
        ):
            reached.add(f"{modules[node.value.id]}.{node.attr}")
    return {f"{here}: {name}" for name in reached}


def _private_to_another_package(full: str, owner: str) -> set[str]:
    """`full` (an imported module, or a name imported from one) if it is inside a private
    module or package of another package than `owner`."""
    parts = full.split(".")
    for index, part in enumerate(parts):
        if is_private(part):
            return set() if ".".join(parts[:index]) == owner else {full}
    return set()


class LongModule(UserWarning):
    """A module over MAX_MODULE_LINES lines of code: worth splitting by what it knows, if
    it holds more than one concept (a long module that is one concept is fine)."""


def warn_about_long_modules(paths: list[Path], root: Path = ROOT) -> dict[str, int]:
    long = {
        dotted_name(path, root): length
        for path in paths
        if (length := len(code_lines(path))) > MAX_MODULE_LINES
    }
    for name, length in sorted(long.items()):
        message = f"{name} has {length} lines of code (more than {MAX_MODULE_LINES})"
        warnings.warn(message, LongModule, stacklevel=2)
    return long


def test_functions_are_at_most_60_lines_of_code() -> None:
    long = {
        name: length
        for name, length in long_functions(SOURCES).items()
        if name not in LONG_FUNCTIONS_ALLOWED
    }
    assert long == {}, "split these (or allow them in LONG_FUNCTIONS_ALLOWED, with why)"


def test_every_long_function_allowed_is_still_long() -> None:
    stale = sorted(set(LONG_FUNCTIONS_ALLOWED) - set(long_functions(SOURCES)))
    assert stale == [], "no longer too long, or gone: take them off LONG_FUNCTIONS_ALLOWED"


def test_nothing_reaches_into_what_is_private_elsewhere() -> None:
    reached = set().union(*(private_reaches(path) for path in SOURCES))
    assert sorted(reached - set(PRIVATE_REACHES_ALLOWED)) == []


def test_every_private_reach_allowed_is_still_made() -> None:
    reached = set().union(*(private_reaches(path) for path in SOURCES))
    stale = sorted(set(PRIVATE_REACHES_ALLOWED) - reached)
    assert stale == [], "no longer made: take them off PRIVATE_REACHES_ALLOWED"


@pytest.mark.filterwarnings("default::tests.unit.test_layers.LongModule")
def test_a_module_over_400_lines_of_code_is_a_warning() -> None:
    warn_about_long_modules(SOURCES)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def code(count: int, indent: str = "    ") -> str:
    """`count` lines of code, each after a comment and a blank line."""
    return "".join(f"{indent}# why {i}\n\n{indent}x{i} = {i}\n" for i in range(count))


def test_the_function_check_sees_a_planted_long_function(tmp_path: Path) -> None:
    docstring = '    """A docstring\n\n    of several lines."""\n'
    module = write(
        tmp_path / "pkg" / "bad.py",
        f"def long():\n{docstring}{code(60)}\n\n"
        f"def just_fits():\n{docstring}{code(59)}\n\n"
        f"class Holder:\n    @staticmethod\n    def method():\n{code(60, ' ' * 8)}",
    )
    assert long_functions([module], tmp_path) == {
        "pkg.bad.long": 61,  # the `def` line and 60 statements
        "pkg.bad.Holder.method": 61,
    }


def test_the_privacy_check_sees_planted_reaches(tmp_path: Path) -> None:
    for name in ("__init__", "_waiting", "rabbitmq/__init__", "rabbitmq/_fastpath"):
        write(tmp_path / "ingest" / f"{name}.py", "")
    for name in ("__init__", "cli", "_own"):
        write(tmp_path / "ingest" / "service" / f"{name}.py", "")
    module = write(
        tmp_path / "ingest" / "service" / "bad.py",
        "import ingest.service.cli as cli\n"
        "from ingest._waiting import first_of\n"
        "from ingest.rabbitmq import _fastpath as fastpath\n"
        "from ingest.rabbitmq._fastpath import usable\n"
        "from ingest.service._own import fine\n"
        "from ingest.service.cli import _helper\n"
        "from . import _own\n"
        "def f():\n"
        "    fastpath._refuse('reason')\n"
        "    return cli._private, _own._allowed_here\n",
    )
    assert private_reaches(module, tmp_path) == {
        "ingest.service.bad: ingest._waiting.first_of",
        "ingest.service.bad: ingest.rabbitmq._fastpath",
        "ingest.service.bad: ingest.rabbitmq._fastpath.usable",
        "ingest.service.bad: ingest.rabbitmq._fastpath._refuse",
        "ingest.service.bad: ingest.service.cli._helper",
        "ingest.service.bad: ingest.service.cli._private",
        "ingest.service.bad: ingest.service._own._allowed_here",
    }


def test_a_private_package_belongs_to_its_parent(tmp_path: Path) -> None:
    for name in ("__init__", "_wire", "_aiormq/__init__", "_aiormq/gate"):
        write(tmp_path / "ingest" / "rabbitmq" / f"{name}.py", "")
    module = write(
        tmp_path / "ingest" / "rabbitmq" / "_aiormq" / "reader.py",
        "from ingest.rabbitmq._wire import FRAME_END\nfrom ingest.rabbitmq._aiormq import gate\n",
    )
    assert owner_of(module, tmp_path) == "ingest.rabbitmq"
    assert private_reaches(module, tmp_path) == set()


def test_the_module_check_warns_of_a_planted_long_module(tmp_path: Path) -> None:
    long = write(tmp_path / "long.py", '"""Docstring."""\n' + code(401, ""))
    fits = write(tmp_path / "fits.py", '"""Docstring\n\nof lines."""\n' + code(400, ""))
    with pytest.warns(LongModule, match="long has 401 lines of code"):
        assert warn_about_long_modules([long, fits], tmp_path) == {"long": 401}
