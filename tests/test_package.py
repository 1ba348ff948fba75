import subprocess
import sys

import kernels
import peers
import swarm
import transport
from transport.errors import FatalError, RetryableError, SwarmError


def test_packages_import_without_side_effects():
    for module in (kernels, transport, swarm, peers):
        assert module.__doc__


def test_error_tree_marks_retryability():
    assert issubclass(transport.DeadlineExceeded, RetryableError)
    assert issubclass(transport.MalformedMessage, FatalError)
    assert transport.ServerBusy.retryable and not transport.MessageTooLarge.retryable
    assert issubclass(transport.ConfigurationError, ValueError)
    for cls in (RetryableError, FatalError):
        assert issubclass(cls, SwarmError)


def test_cli_version():
    out = subprocess.run(
        [sys.executable, "-m", "peers.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("swarm ")


LAYERS = ("kernels", "transport", "swarm", "peers")  # each may import only itself and those before it


def _imports(path, package_root):
    """(imported module, at module level?) for every import in ``path``, relative ones resolved."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = ".".join(path.relative_to(package_root).with_suffix("").parts)
    function_nodes = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        top = id(node) not in function_nodes
        if isinstance(node, ast.Import):
            yield from ((alias.name, top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            yield base, top
            yield from ((f"{base}.{alias.name}", top) for alias in node.names)


def test_imports_point_one_way_and_form_no_cycles():
    """kernels <- transport <- swarm <- peers, even for lazy imports; no cycle among the
    module-level imports (TYPE_CHECKING ones included: they stand for a file reaching
    into another's internals)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for layer in LAYERS
        for path in (root / layer).rglob("*.py")
    }
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        rank = LAYERS.index(name.split(".")[0])
        for imported, top in _imports(path, root):
            head = imported.split(".")[0]
            if head in LAYERS:
                assert LAYERS.index(head) <= rank, f"{name} imports {imported}: against the layers"
            if top and imported in files and imported != name and files[imported].name != "__init__.py":
                edges[name].add(imported)

    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in edges[name]:
            if state.get(other) == 1:
                cycle = [*path[path.index(other) :], other]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other, [*path, other])
        state[name] = 2

    for name in edges:
        if name not in state:
            visit(name, [name])


def test_no_two_modules_share_a_name_across_packages():
    """A reader finds each concept by its file name alone (issue #12)."""
    from collections import defaultdict
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    places = defaultdict(list)
    for layer in LAYERS:
        for path in (root / layer).rglob("*.py"):
            if path.name != "__init__.py":
                places[path.name].append(str(path.relative_to(root)))
    shared = {name: paths for name, paths in places.items() if len(paths) > 1}
    assert not shared, f"modules that share a name: {shared}"
