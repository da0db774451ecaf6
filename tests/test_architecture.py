"""The layout's rules that a reader relies on, checked on the source tree."""

import ast
from pathlib import Path

from quant.schemes import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["app.py", "ui", "serving", "models", "quant", "cpu_backend", "gpu_backend", "remote_backend", "bench"]


def python_files() -> list[Path]:
    files = []
    for entry in SOURCES:
        path = ROOT / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_a_quantized_scheme_is_named_in_quant_schemes_only():
    """Every other module asks the registry or a backend (bf16 is also a dtype's name, so it is not checked;
    docstrings are prose and may name schemes)."""
    names = {name for name, scheme in REGISTRY.items() if scheme.quantizes_weights}
    assert len(names) >= 4
    spelled = []
    for path in python_files():
        if path == ROOT / "quant" / "schemes.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
        }  # prose may name a scheme; code may not
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                words = node.value.replace(",", " ").split()
                if any(w in names for w in words):
                    spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:60]!r}")
    assert not spelled, "\n".join(spelled)


def test_models_and_quant_import_no_backend_and_no_ui():
    for folder in ("models", "quant"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom | ast.Import):
                    modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    for m in modules:
                        root = m.split(".")[0]
                        assert root not in {"cpu_backend", "gpu_backend", "remote_backend", "serving", "app", "ui",
                                            "gradio"}, f"{path.relative_to(ROOT)} imports {m}"
