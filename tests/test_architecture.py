"""The package's layering, enforced by import-linter (contracts in
pyproject.toml, [tool.importlinter]; the layers are described in the README's
"Where things are").

The committed tree keeps every contract, and each contract fails on a
deliberately broken copy of the package: an upward import, a backend room
importing the registry, an import cycle inside one layer.
"""

import os
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT_IMPORTS = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint_imports(root):
    """Run lint-imports on the package found in `root` (its pyproject.toml);
    the copy comes first on PYTHONPATH, before the installed package."""
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run([LINT_IMPORTS], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_contracts():
    res = _lint_imports(REPO_ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


@pytest.mark.parametrize("module,line,broken", [
    # a leaf importing the benchmark tooling: upward across four layers
    ("common/sizes.py", "from ..bench import shapes", "Layers: tooling > public API"),
    # the op layer importing the public API above it
    ("ops/inference.py", "from .. import block", "Layers: tooling > public API"),
    # a backend room importing the registry
    ("backends/triton/_common.py", "from .. import registry", "Backends: the registry imports the rooms"),
    # a cycle inside one layer (tuning already imports timing)
    ("common/timing.py", "from . import tuning", "No import cycles"),
], ids=["leaf-imports-tooling", "ops-imports-api", "room-imports-registry", "cycle-in-leaves"])
def test_a_broken_copy_breaks_a_contract(tmp_path, module, line, broken):
    shutil.copytree(os.path.join(REPO_ROOT, "resnext_kernels"), tmp_path / "resnext_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_csrc"))
    shutil.copy(os.path.join(REPO_ROOT, "pyproject.toml"), tmp_path)
    with open(tmp_path / "resnext_kernels" / module, "a") as f:
        f.write(f"\n{line}  # the deliberate violation\n")
    res = _lint_imports(str(tmp_path))
    assert res.returncode == 1, res.stdout + res.stderr
    assert any(line.startswith(broken) and line.endswith(" BROKEN") for line in res.stdout.splitlines()), res.stdout
