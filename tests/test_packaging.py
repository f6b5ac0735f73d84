"""What the installed distribution says about itself: licence, supported
Pythons, extras (the metadata a user's pip sees)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parent.parent


def test_licence_is_mit_and_shipped() -> None:
    metadata = importlib.metadata.metadata("boxfiles")
    assert metadata["License-Expression"] == "MIT"
    assert "LICENSE" in metadata.get_all("License-File", [])
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the boxfiles authors\n")


def test_a_classifier_for_every_supported_python() -> None:
    metadata = importlib.metadata.metadata("boxfiles")
    supported = SpecifierSet(metadata["Requires-Python"])
    declared = {
        c.rsplit(" :: ", 1)[1]
        for c in metadata.get_all("Classifier", [])
        if c.startswith("Programming Language :: Python :: 3.")
    }
    allowed = {f"3.{minor}" for minor in range(8, 20) if f"3.{minor}" in supported}
    # Classifiers name the tested versions; 3.14 is admitted, not run here.
    assert declared == {"3.10", "3.11", "3.12", "3.13"}
    assert allowed == declared | {"3.14"}


def test_testing_extra_brings_the_fixtures_plugins() -> None:
    requirements = [Requirement(r) for r in importlib.metadata.requires("boxfiles") or []]
    testing = {
        r.name
        for r in requirements
        if r.marker and "extra" in str(r.marker) and r.marker.evaluate({"extra": "testing"})
    }
    assert testing == {"pytest", "pytest-trio"}
