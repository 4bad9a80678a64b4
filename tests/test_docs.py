"""The documentation's examples run as written.

Every ```python block of a page runs, in order, in one namespace per page (a ```py block is a fragment and is not run),
and the README's two set-up commands are the ones CI runs.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(), flags=re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning writes logs and checkpoints to the working directory
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)


def test_ci_runs_the_readme_commands():
    ci = subprocess.run(
        [
            "bash",
            "-c",
            f"source <(sed -n '/^readme_command()/p' {ROOT}/.ci/run); cd {ROOT}; "
            "readme_command test-command; readme_command main-command",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert ci == [
        "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest",
        "pip install torch==2.13.0 && pip install . && lightning-tbptt demo",
    ]
    assert 'eval "$test_command"' in (ROOT / ".ci" / "run").read_text()
