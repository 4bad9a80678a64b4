"""The examples gallery runs: every script in ``examples/`` on its small setting, each with its page in the docs.

A script states the small setting CI runs it on as a module-level literal ``CI_ARGV`` (a list of strings, read here
without importing the script) and checks its own claims (it raises, or exits non-zero, when one fails).
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "examples").glob("*.py"))


def ci_argv(script: Path) -> list[str]:
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["CI_ARGV"]:
            value = ast.literal_eval(node.value)
            assert isinstance(value, list) and all(isinstance(each, str) for each in value), script
            return value
    raise AssertionError(f"{script.name} has no module-level CI_ARGV = [...] (the small setting CI runs it on)")


def test_the_gallery_has_examples():
    assert len(SCRIPTS) >= 6, [script.name for script in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.stem)
def test_each_example_has_a_docs_page(script):
    page = ROOT / "docs" / "examples" / f"{script.stem}.md"
    assert page.is_file(), f"{script.name} has no page {page.relative_to(ROOT)}"
    assert f"examples/{script.name}" in page.read_text(), f"{page.name} neither includes nor names {script.name}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.stem)
def test_each_example_runs_on_its_small_setting(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script), *ci_argv(script)],
        cwd=tmp_path,  # Lightning writes logs and checkpoints to the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{script.name} {ci_argv(script)}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.stem)
def test_each_example_help_is_plain_text_with_its_defaults(script):
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(default:" in result.stdout
    for markup in ("``", ":class:", ":func:", ":mod:"):
        assert markup not in result.stdout, f"{script.name} --help shows {markup}"
