"""The README's "Writing a test" example, run as it is printed there.

The code block under that heading is this module's test: it is read from
README.md and executed here, so the example cannot drift from what CI runs
(tests/unit/test_readme_examples.py checks the block is there and short)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Writing a test", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


exec(compile(readme_example(), str(README), "exec"))  # defines the example's fixture and test here
