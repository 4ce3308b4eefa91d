"""The house of crate/: imports run one way (no module imports, directly or through others, a module
that imports it), no module reaches into another's private names (`from .x import _name`,
`x._name`), and the README's layout tree lists every module. Checked on the source with ast, so the
check costs milliseconds and imports nothing."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "crate"


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (a package is its __init__)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for each import of a module of the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    found.append((submodule, "", node.lineno))
                elif base in modules:
                    found.append((base, alias.name, node.lineno))
    return found


def _attribute_uses(path: Path, aliases: dict[str, str]) -> list[tuple[str, str, int]]:
    """(module, attribute, line) for each ``alias.attribute`` where ``alias`` names a package module."""
    return [
        (aliases[node.value.id], node.attr, node.lineno)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
    ]


def _module_aliases(path: Path, modules: dict[str, Path], name: str) -> dict[str, str]:
    aliases = {}
    for module, imported, _ in _imports(name, path, modules):
        if not imported:
            aliases[module.rpartition(".")[2]] = module
    return aliases


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = module_names(package)
    return {
        name: {module for module, _, _ in _imports(name, path, modules) if module != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle found by a depth-first search, as the list of modules around it."""
    found, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                found.append([*stack[stack.index(imported) :], imported])
            elif imported not in state:
                visit(imported, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return found


def private_reaches(package: Path) -> list[str]:
    """Each use of another module's underscore name: imported from it, or read as its attribute."""
    modules = module_names(package)
    found = []
    for name, path in modules.items():
        uses = [(m, n, line) for m, n, line in _imports(name, path, modules) if n]
        uses += _attribute_uses(path, _module_aliases(path, modules, name))
        found += [
            f"{path.relative_to(package.parent)}:{line} uses {module}.{attribute}"
            for module, attribute, line in uses
            if module != name and attribute.startswith("_") and not attribute.startswith("__")
        ]
    return found


def test_crate_has_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_no_module_of_crate_uses_another_modules_private_names():
    assert private_reaches(PACKAGE) == []


@pytest.fixture
def tangled(tmp_path: Path) -> Path:
    """A package with a cycle a -> b -> a through a relative and an absolute import, and a private
    name taken across modules both ways (imported, and read as an attribute)."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("from .b import _hidden\n")
    (package / "sub" / "b.py").write_text("def _hidden(): ...\n\n\ndef f():\n    from pkg.sub import a\n")
    (package / "c.py").write_text("from .sub import b\n\nb._hidden()\n")
    return package


def test_the_checks_find_a_cycle_and_private_names(tangled):
    """The checks above can fail: on a package built to break both rules they report each break."""
    assert [set(cycle) for cycle in cycles(import_graph(tangled))] == [{"pkg.sub.a", "pkg.sub.b"}]
    assert private_reaches(tangled) == [
        "pkg/c.py:3 uses pkg.sub.b._hidden",
        "pkg/sub/a.py:1 uses pkg.sub.b._hidden",
    ]


def readme_tree(readme: str) -> set[str]:
    """The file paths of the README's layout tree: the code block under "## Layout" that starts at
    "crate/", two spaces of indentation a level."""
    block = re.search(r"^## Layout\n.*?^```\n(crate/\n.*?)^```", readme, re.MULTILINE | re.DOTALL)
    assert block, 'README.md has no "## Layout" section with a crate/ tree'
    paths, folders = set(), []
    for line in block[1].splitlines():
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip())) // 2
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            paths.add("/".join([*folders, name]))
    return paths


def test_the_readme_layout_lists_every_module_of_crate():
    modules = {
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    assert readme_tree((ROOT / "README.md").read_text()) == modules


LONGEST_MODULE = 500  # lines; issue 20 left the largest module under ~450


def test_no_module_of_crate_is_longer_than_the_house_allows():
    lengths = {
        path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert {path: n for path, n in lengths.items() if n > LONGEST_MODULE} == {}
