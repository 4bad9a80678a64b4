"""Release hygiene that the test suite can check: the version, its changelog entry, the license and the entry point."""

import re
from importlib.metadata import metadata
from pathlib import Path

import lightning_tbptt

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_released_in_the_changelog():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.fullmatch(r"\d+\.\d+\.\d+", lightning_tbptt.__version__)
    headings = re.findall(r"^## \[(.+?)\](?: - (\d{4}-\d{2}-\d{2}))?$", changelog, flags=re.MULTILINE)
    assert headings[0] == ("Unreleased", "")
    assert headings[1][0] == lightning_tbptt.__version__ and headings[1][1]


def test_distribution_metadata():
    installed = metadata("lightning-tbptt")
    assert installed["Version"] == lightning_tbptt.__version__
    assert installed["License-Expression"] == "Apache-2.0"
    assert installed.get_all("License-File") == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    # a library's requirements are ranges: CI installs the pinned CPU torch first
    requirements = installed.get_all("Requires-Dist")
    assert any(r.startswith("torch>=") for r in requirements)
    assert all("==" not in r for r in requirements if "extra ==" not in r)


def test_pytorch_lightning_is_required_and_lightning_is_the_extra():
    # every `lightning` release requires `pytorch-lightning` itself, so requiring it costs a `lightning.pytorch` user
    # nothing; the library imports neither package by name (tests/test_namespaces.py runs it with each alone)
    requirements = metadata("lightning-tbptt").get_all("Requires-Dist")
    names = re.compile(r"(pytorch-lightning|lightning)\b(?!-)")
    required = [r for r in requirements if names.match(r) and "extra ==" not in r]
    assert len(required) == 1 and required[0].startswith("pytorch-lightning"), required
    assert any(re.match(r"lightning[!<>=]", r) and 'extra == "lightning"' in r for r in requirements)


def test_the_malicious_lightning_releases_are_excluded_and_the_classifiers_are_true():
    installed = metadata("lightning-tbptt")
    names = re.compile(r"(pytorch-lightning|lightning)\b(?!-)")
    lightning = [r for r in installed.get_all("Requires-Dist") if names.match(r)]
    assert lightning, "both namespaces' packages are required (the second as an extra)"
    for requirement in lightning:  # GHSA-w37p-236h-pfx3
        assert "!=2.6.2" in requirement and "!=2.6.3" in requirement, requirement
    assert "Framework :: Pytest" not in installed.get_all("Classifier"), "this is not a pytest plugin"
