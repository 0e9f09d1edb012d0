"""No module of the package (or a benchmark) imports another module's private names: what one
module needs from another is public there, so the layers' contract (`lint-imports`) sees the real
dependencies."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ALLOWED = {"_C", "__version__"}  # the compiled extension module; the version attribute


def private_imports(root: Path) -> list[str]:
    """`file:line imports [names] from module` for each import of a private name from the package."""
    found = []
    for path in sorted(root.rglob("*.py")):
        folders = [root / p for p in path.relative_to(root).parents if p != Path(".")]
        if any((d / "pyvenv.cfg").is_file() for d in folders):
            continue  # a virtual environment inside the tree (benchmarks/peers-venv): not our code
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "sdk"):
                bad = [a.name for a in node.names if a.name.startswith("_") and a.name not in ALLOWED]
                if bad:
                    found.append(f"{path.relative_to(root)}:{node.lineno} imports {bad} from {node.module or '.'}")
    return found


def test_no_private_name_is_imported_across_modules():
    found = private_imports(REPO / "sdk") + private_imports(REPO / "benchmarks")
    assert not found, "\n".join(found)


def test_the_check_sees_private_imports(tmp_path):
    (tmp_path / "a.py").write_text("from sdk.embedder import _column, Embedder\nfrom .b import public, _hidden\n"
                                   "from numpy import _private_elsewhere\nfrom sdk import _C, __version__\n")
    assert private_imports(tmp_path) == ["a.py:1 imports ['_column'] from sdk.embedder",
                                         "a.py:2 imports ['_hidden'] from b"]
