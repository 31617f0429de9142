"""The README's tutorial walk-through, run against a server: by the README test and by `make container-test`.

`python -m tests.walkthrough HOST:PORT` runs it, prints what it printed, and exits 1 if that differs from the
output the README shows.
"""

import contextlib
import difflib
import io
import re
import sys
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()
README_ADDRESS = "127.0.0.1:50051"


def fenced_block_after(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", README, re.S)
    assert match, f"README has no block after {marker}"
    return match.group(1)


def run_example(name: str, replacements: dict[str, str]) -> tuple[str, dict]:
    """Runs the README's `name:code` block with each key replaced by its value (e.g. the README's address by
    a test server's); returns what it printed and its variables."""
    code = fenced_block_after(f"{name}:code")
    for old, new in replacements.items():
        assert old in code, f"the README's {name} example has no {old!r}"
        code = code.replace(old, new)
    printed, variables = io.StringIO(), {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README {name}", "exec"), variables)
    return printed.getvalue(), variables


def run_walkthrough(address: str) -> str:
    """Runs the walk-through against `address` (its asserts check stepped == whole); returns its output."""
    return run_example("walkthrough", {README_ADDRESS: address})[0]


def main(argv: list[str]) -> int:
    printed = run_walkthrough(argv[1] if len(argv) > 1 else README_ADDRESS)
    print(printed, end="")
    expected = fenced_block_after("walkthrough:output")
    if printed != expected:
        sys.stdout.writelines(difflib.unified_diff(expected.splitlines(True), printed.splitlines(True),
                                                   "README", "printed"))
        return 1
    print("walk-through output matches the README")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
