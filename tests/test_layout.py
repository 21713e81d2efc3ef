"""The layering (docs/ARCHITECTURE.md) holds: `lint-imports` checks the contracts in
pyproject.toml ([tool.importlinter]) over the installed eir package."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is in the test extras: pip install -e '.[test]'"
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
