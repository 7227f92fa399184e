"""The folders of grains_edge are the pipeline's stages, and no module imports from a stage after its own."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the stages in pipeline order; a module may import from its own stage and those before it
STAGES = (
    (
        "shared",
        ("errors", "paths", "options", "devices", "prompts", "layers", "locking", "safe_text", "crash_log", "data"),
    ),
    ("model", ("model",)),  # the Hugging Face model in PyTorch: sources, steering hooks
    ("steer", ("steer",)),  # attribution, vectors, profiles
    ("kernels", ("kernels",)),  # grains-edge's own ONNX Runtime ops
    ("export", ("export",)),  # the steered ONNX graph and its manifest
    ("runtime", ("runtime",)),  # the engine
    ("evaluate", ("evaluate",)),  # datasets and scoring through the engine
    ("store", ("store",)),  # chat history
    ("apps", ("tui", "serve", "commands", "cli")),
)
FOLDERS = {"grains_edge": "grains_edge", "export": "grains_edge.export", "tui": "grains_edge.tui"}


def stage_of(module: str) -> int:
    """The index in STAGES of a grains_edge module (dotted name)."""
    top = module.split(".")[1]
    for index, (_, members) in enumerate(STAGES):
        if top in members:
            return index
    raise AssertionError(f"grains_edge.{top} is in no stage; fix: move it into a stage's folder or name it in STAGES")


def modules() -> dict[str, Path]:
    """Every module of the package by its installed name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> set[str]:
    """The grains_edge modules `path` imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; fix: import from grains_edge"
            names |= (
                {f"{node.module}.{alias.name}" for alias in node.names}
                if node.module == "grains_edge"
                else {node.module}
            )
    return {name for name in names if name.startswith("grains_edge.")}


def test_every_module_is_in_a_stage():
    for module in modules():
        if module != "grains_edge":
            stage_of(module)


def test_no_module_imports_from_a_later_stage():
    upward = [
        f"{module} ({STAGES[stage_of(module)][0]}) imports {name} ({STAGES[stage_of(name)][0]})"
        for module, path in modules().items()
        if module != "grains_edge"
        for name in imports(path)
        if stage_of(name) > stage_of(module)
    ]
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    engine = tmp_path / "engine.py"
    engine.write_text("def f():\n    from grains_edge.tui.app import run_chat\n")
    assert stage_of(next(iter(imports(engine)))) > stage_of("grains_edge.runtime.engine")
