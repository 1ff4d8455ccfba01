"""The package's shape: modules that import each other in one direction only."""

import ast
from pathlib import Path

import ldm_pipeline

ROOT = Path(ldm_pipeline.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """ldm_pipeline modules `path` imports anywhere (function-level imports included: they hide cycles, not
    remove them)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` depends on the submodule; `from mod import name` on the module
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        found |= {n for n in names if n in modules}
    me = module_name(path)
    return {n for n in found if not me.startswith(n + ".")}  # a module's own parent packages run first anyway


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def test_no_import_cycles():
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph = {m: imports_of(p, modules) - {m} for m, p in files.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_toolkit_never_imports_the_shapes_demo():
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    users = sorted(m for m, p in files.items() if not m.startswith("ldm_pipeline.shapes")
                   and any(n.startswith("ldm_pipeline.shapes") for n in imports_of(p, modules)))
    assert users == [], users  # the demo builds on the toolkit, never the other way (cli's COMMANDS names it by string)


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def test_modules_and_functions_stay_readable():
    """No module over ~500 lines; no function over ~80 lines unless its signature carries a comment saying why."""
    too_long = []
    for path in sorted(ROOT.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT.parent)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                signature = lines[node.lineno - 1:node.body[0].lineno - 1]
                if n > MAX_FUNCTION_LINES and not any("#" in line for line in signature):
                    too_long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}: {n} lines")
    assert too_long == [], "\n".join(too_long)
