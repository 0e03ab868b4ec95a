"""core/ imports neither vllm nor torch; runtime/ does not import vllm."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "vllm_moe_offload"


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("folder, banned", [("core", {"vllm", "torch"}), ("runtime", {"vllm"})])
def test_layers_do_not_import_what_they_must_not(folder, banned):
    files = list((PKG / folder).rglob("*.py"))
    assert files
    for f in files:
        assert not imported_roots(f) & banned, f"{f} imports {imported_roots(f) & banned}"
