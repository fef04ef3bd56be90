"""The map in the repository stays true: docs/API.md states the contract of every public op, the README's
"Layout" names every module of the package and its kernels, and ``rlhf_fast.train``'s docstring lists its
modules (only those that exist)."""

import re
from pathlib import Path

import rlhf_fast as rf
import rlhf_fast.train

ROOT = Path(__file__).resolve().parents[1]


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```text\n", 1)[1].split("```", 1)[0]


def test_api_document_covers_every_public_op():
    """Each public callable's signature line in docs/API.md (``name(`` in code), with every one of its
    keyword arguments named in the document."""
    api = (ROOT / "docs" / "API.md").read_text()
    import inspect

    for name in rf.__all__:
        obj = getattr(rf, name)
        if name.startswith("__") or not callable(obj):
            assert f"`{name}`" in api or name.startswith("__"), name
            continue
        assert f"`{name}(" in api, f"docs/API.md has no signature for rf.{name}"
        for param in inspect.signature(obj).parameters.values():
            if param.kind is inspect.Parameter.KEYWORD_ONLY:
                assert re.search(rf"\b{param.name}\b", api), f"rf.{name}'s {param.name} is not in docs/API.md"


def test_layout_names_every_module():
    block = _layout_block()
    folders = {"rlhf_fast": ROOT / "rlhf_fast", "kernels": ROOT / "kernels"}
    missing = []
    for path in [*folders["rlhf_fast"].rglob("*.py"), *folders["kernels"].glob("*.py")]:
        if path.name == "__init__.py" and path.parent.name not in ("rlhf_fast",):
            continue  # a folder's own __init__ is the folder's line
        if not re.search(rf"(?<![\w/]){re.escape(path.name)}", block):
            missing.append(str(path.relative_to(ROOT)))
    for folder in ("rlhf_fast/", "kernels/", "train/", "integrations/", "demo/", "benchmarks/", "tests/",
                   "docs/API.md", ".ci/run"):  # fmt: skip
        assert folder in block, folder
    assert not missing, f"README 'Layout' does not name {missing}"


def test_train_docstring_lists_existing_modules():
    """Every ``name`` bullet of rlhf_fast.train's docstring is a module of the folder."""
    listed = set(re.findall(r"``(\w+)``", rlhf_fast.train.__doc__))
    modules = {p.stem for p in Path(rlhf_fast.train.__file__).parent.glob("*.py")}
    bullets = set(re.findall(r"^- ``(\w+)``", rlhf_fast.train.__doc__, re.M))
    assert bullets and bullets <= modules, bullets - modules
    assert {"config", "loop", "checkpoint", "models", "data"} <= listed
