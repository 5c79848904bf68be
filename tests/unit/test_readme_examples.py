"""The README's driver-author example exists, is about ten lines, and is what
tests/integration/test_readme_driver_author.py runs."""

import ast

from tests.integration.test_readme_driver_author import readme_example


def test_the_example_is_a_short_pytest_module():
    code = readme_example()
    tree = ast.parse(code)
    tests = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert tests == ["test_my_disk_survives_dom0_being_killed"]
    lines = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) <= 14, f"{len(lines)} lines: keep the README example short"
