"""Each layer imports only from the layers below it (or itself), wherever the import statement sits.

core (pure functions) < models, data < config < federated (the round) < runtime (embedded, Flower, run
records) < interface (API, CLI, reports) < the package entry points.
"""

import ast
from pathlib import Path

import cellm

SRC = Path(cellm.__file__).parent
LAYERS = [  # (module prefix, layer): the longest matching prefix wins
    ("cellm.errors", 0), ("cellm.core", 0),
    ("cellm.models", 1), ("cellm.data", 1),
    ("cellm.config", 2),
    ("cellm.federated", 3),
    ("cellm.runtime", 4),
    ("cellm.interface", 5), ("cellm.methods", 5),
    ("cellm.cli", 6), ("cellm", 6),
]


def layer_of(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def module_name(path: Path) -> str:
    parts = ["cellm", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def cellm_imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "cellm"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cellm":
            out.append(node.module)
    return out


def test_no_module_imports_a_layer_above_its_own():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        me = module_name(path)
        for target in cellm_imports(path):
            if layer_of(target) > layer_of(me):
                bad.append(f"{me} (layer {layer_of(me)}) imports {target} (layer {layer_of(target)})")
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from cellm.interface import api\n")
    assert cellm_imports(f) == ["cellm.interface"]
    assert layer_of("cellm.interface.api") > layer_of("cellm.runtime.record") > layer_of("cellm.core.topk")


def _imports_of(module: str) -> set[str]:
    rel = Path(*module.split(".")[1:])
    path = SRC / rel.with_suffix(".py") if (SRC / rel.with_suffix(".py")).exists() else SRC / rel / "__init__.py"
    return set(cellm_imports(path))


def _module_imports(path: Path, names: set[str]) -> set[str]:
    """The cellm modules ``path`` imports: ``from cellm.x import y`` imports cellm.x.y if that is a module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.ImportFrom) and node.module in names:
            subs = {f"{node.module}.{a.name}" for a in node.names} & names
            out |= subs or {node.module}
    return out


def test_server_and_client_share_only_the_messages_module():
    server, client = "cellm.federated.server", "cellm.federated.client"
    assert client not in _imports_of(server) and server not in _imports_of(client)
    assert "cellm.federated.messages" in _imports_of(server) & _imports_of(client)


def test_the_flower_apps_do_not_reach_into_each_other_or_the_other_side():
    client_app = _imports_of("cellm.runtime.flower.client_app")
    server_app = _imports_of("cellm.runtime.flower.server_app")
    assert "cellm.federated.server" not in client_app and "cellm.runtime.flower.server_app" not in client_app
    assert "cellm.federated.client" not in server_app and "cellm.runtime.flower.client_app" not in server_app


def test_only_the_stages_module_switches_stages():
    """SLoRA's stage mechanics (:mod:`cellm.models.stages`) are used by the run only through runtime/stages."""
    users = sorted(module_name(p) for p in SRC.rglob("*.py")
                   if "cellm.models.stages" in cellm_imports(p))
    assert users == ["cellm.runtime.stages"], users


def test_the_checkpoint_does_not_import_the_round_loop():
    assert not {"cellm.runtime.driver", "cellm.runtime.session"} & _imports_of("cellm.runtime.checkpoint")


def test_no_two_modules_import_each_other_even_indirectly():
    names = {module_name(p) for p in SRC.rglob("*.py")}
    edges = {module_name(p): {t for t in _module_imports(p, names) if t != module_name(p)} for p in SRC.rglob("*.py")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycle.extend(stack[stack.index(n):] + [n])
                return True
            if n not in state and visit(n, stack + [n]):
                return True
        state[m] = 2
        return False

    for m in sorted(edges):
        if m not in state and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)
