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
