"""The pytest plugin, as a user meets it: the README's example test file, run
by pytest in a subprocess with nothing but boxfiles installed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_user_test() -> str:
    match = re.search(r"<!-- user-test -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README lost its user-test example"
    return match.group(1)


def test_readme_example_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=readme_user_test())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=2)


def test_fixture_failure_is_reported_not_hidden(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
import pytest
import boxfiles

@pytest.mark.trio
async def test_missing(files_client, tmp_path):
    with pytest.raises(boxfiles.NotFound):
        await files_client.download_tar("/nope", tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_missing_pytest_trio_names_the_extra(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
async def test_server(files_server):
    pass

async def test_client(files_client):
    pass

def test_faults(fault_server):
    pass

def test_unrelated():
    pass
"""
    )
    # -p no:trio: as if pytest-trio were not installed.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:trio")
    result.assert_outcomes(passed=1, errors=3)
    assert result.stdout.str().count("pip install 'boxfiles[testing]'") >= 3
    result.stdout.fnmatch_lines(["*boxfiles' pytest fixtures need the pytest-trio plugin*"] * 3)
