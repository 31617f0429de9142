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


def run_walkthrough(address: str) -> str:
    """Runs the walk-through against `address` (its asserts check stepped == whole); returns its output."""
    code = fenced_block_after("walkthrough:code").replace(README_ADDRESS, address)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README walk-through", "exec"), {})
    return printed.getvalue()


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
