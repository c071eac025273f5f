"""Dependencies flow one way (pallas_kernels <- layers <- mem_lm <- train <- eval): `train`
imports nothing from `eval`, at import time or inside a function."""
import ast
import pathlib
import subprocess
import sys

TRAIN = pathlib.Path(__file__).resolve().parents[2] / "train"


def test_importing_every_train_module_loads_no_eval_module():
    # A fresh interpreter: every module of the train package (found by walking it, so new ones
    # are covered), then not one `eval` module may be loaded.
    code = (
        "import pkgutil, sys, train, train.data, train.config, train.tasks\n"
        "names = [m.name for m in pkgutil.walk_packages(train.__path__, 'train.')]\n"
        "for n in names: __import__(n)\n"
        "assert {'train.tasks.mqar', 'train.tasks.niah', 'train.loop'} <= set(names), names\n"
        "bad = sorted(m for m in sys.modules if m == 'eval' or m.startswith('eval.'))\n"
        "assert not bad, bad\n"
        "print(len(names))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) >= 10


def test_no_train_source_names_eval_even_lazily():
    # The runtime check above misses an import inside a function that the import did not run.
    found = []
    for path in sorted(TRAIN.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {m}" for m in mods
                      if m == "eval" or m.startswith("eval.")]
    assert not found, found
