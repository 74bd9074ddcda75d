"""The documentation's code runs, and its table of settings is complete.

    docs/**/*.md, README.md ── fenced ```python blocks, in page order ──> blocks.json
    pytest ── one fresh `python runner.py blocks.json` per page ──> each block exec'd in that
        process's __main__, a marker line on stdout after each ──> stdout split per block,
        compared with the output the page shows for it

A page's blocks run in one process, in order, as one script would: a later block sees what
an earlier one defined, ``if __name__ == "__main__":`` is true, and what they define is
pickled by value as a user's script's would be. Tracebacks name the Markdown file and line.
``BIGEXEC_SYSTEM=threads`` is set, so that a sample written for any system (``bigexec.start()``
with no argument, an ec2 program that takes its system from the environment) runs here on
in-process machines; a sample that names ``local`` runs on local processes.

What a block shows as its output, and what is checked: the stdout of the block must match a
```` ```text ```` block that follows it (only blank lines between), and/or its ``# prints: ...``
comments, in order. ``...`` in an expected line matches any text, and a line that is only
``...`` matches any number of lines. A block that shows no output must only not fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bigexec.systems.ec2.options import ENV_PREFIX, Ec2Options

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TABLE = DOCS / "reference" / "configuration.md"
PAGE_TIMEOUT = 120.0  # seconds for one page's blocks; every sample is meant to take a few
END_OF_BLOCK = "--- end of a documentation block ---"

_FENCE = re.compile(r"^```([\w-]*)\s*$")
_PRINTS = re.compile(r"#\s*prints:\s?(.*)$")

# Run as the page's __main__: every block exec'd in this module's namespace, in order.
RUNNER = f"""\
import json, sys
for _block in json.load(open(sys.argv[1])):
    exec(compile("\\n" * (_block["line"] - 1) + _block["code"], _block["path"], "exec"))
    sys.stdout.flush()
    print({END_OF_BLOCK!r}, flush=True)
"""


@dataclasses.dataclass
class Block:
    path: str  # relative to the repository
    line: int  # of the block's first line of code
    lang: str
    code: str
    expected: list[str] | None = None  # the output the page shows for it


def blocks_of(path: Path) -> list[Block]:
    """The page's fenced blocks; each python block gets the output the page shows for it."""
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    between: list[str] = []  # the lines since the last block closed
    i = 0
    while i < len(lines):
        opened = _FENCE.match(lines[i])
        if not opened:
            between.append(lines[i])
            i += 1
            continue
        start = i + 1
        i = start
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise AssertionError(f"{rel}:{start}: a code block that is never closed")
        block = Block(rel, start + 1, opened.group(1), "\n".join(lines[start:i]) + "\n")
        previous = blocks[-1] if blocks else None
        if (block.lang == "text" and previous is not None and previous.lang == "python"
                and not any(line.strip() for line in between)):
            previous.expected = (previous.expected or []) + block.code.splitlines()
        if block.lang == "python":
            shown = [m.group(1).rstrip() for m in map(_PRINTS.search, block.code.splitlines())
                     if m]
            block.expected = shown or None
        blocks.append(block)
        between = []
        i += 1
    return blocks


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted(DOCS.rglob("*.md"))


def python_pages() -> list[Path]:
    return [p for p in pages() if any(b.lang == "python" for b in blocks_of(p))]


def output_matches(expected: list[str], actual: str) -> bool:
    pattern = ""
    for line in expected:
        if line.strip() == "...":
            pattern += r"(?:.*\n)*?"
        else:
            pattern += ".*".join(map(re.escape, line.rstrip().split("..."))) + r"[ \t]*\n"
    text = "".join(line.rstrip() + "\n" for line in actual.splitlines())
    return re.fullmatch(pattern, text) is not None


def run_page(path: Path, tmp_path: Path) -> list[str]:
    """Run the page's python blocks; return what each printed. Fails the test with the
    block's line and the process's output when the page does not run."""
    code = [b for b in blocks_of(path) if b.lang == "python"]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([dataclasses.asdict(b) for b in code]))
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = dict(os.environ, BIGEXEC_SYSTEM="threads", PYTHONUNBUFFERED="1",
               BIGEXEC_CONFIG=str(tmp_path / "no-config.toml"))  # not the user's file
    env.pop("BIGEXEC_DEBUG_ADDR", None)
    try:
        done = subprocess.run([sys.executable, str(runner), str(spec)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=PAGE_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{path.name}: its samples did not end within {PAGE_TIMEOUT}s; "
                             f"stdout so far:\n{exc.stdout}\nstderr:\n{exc.stderr}") from None
    outputs = done.stdout.split(END_OF_BLOCK + "\n")
    # raised rather than asserted: pytest would indent the messages' lines, which quote output
    if done.returncode != 0:
        failed = code[min(len(outputs), len(code)) - 1]
        raise AssertionError(f"{path.name}: the block at line {failed.line} failed (exit "
                             f"{done.returncode}):\n{done.stderr}\nstdout:\n{done.stdout}")
    for block, out in zip(code, outputs, strict=False):
        if block.expected is not None and not output_matches(block.expected, out):
            raise AssertionError(f"{block.path}:{block.line}: the block printed\n{out}\n"
                                 f"but the page shows\n" + "\n".join(block.expected))
    return outputs[: len(code)]


@pytest.mark.parametrize("path", python_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_samples_of_the_page_run_and_print_what_it_shows(path: Path,
                                                              tmp_path: Path) -> None:
    run_page(path, tmp_path)


def test_a_sample_that_prints_something_else_fails(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nprint('two')\n```\n\n```text\none\n```\n")
    with pytest.raises(AssertionError, match="the page shows\none"):
        run_page(page, tmp_path)


def test_a_failing_sample_fails_naming_its_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n```python\nx = 1\n```\n\n```python\nassert x == 2\n```\n")
    with pytest.raises(AssertionError, match="the block at line 8 failed") as failed:
        run_page(page, tmp_path)
    assert f'File "{page}", line 8' in str(failed.value)


def test_a_page_s_blocks_share_one_main_and_match_output_loosely(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nimport os\npid = os.getpid()\nprint('a', pid)  # prints: a ...\n```\n"
        "```python\nassert __name__ == '__main__' and os.getpid() == pid\n"
        "for i in range(3):\n    print(i)\n```\n\n```text\n0\n...\n```\n")
    assert run_page(page, tmp_path)[1] == "0\n1\n2\n"


def test_expected_output_wildcards() -> None:
    assert output_matches(["x = ...", "..."], "x = 12\nmore\nlines\n")
    assert output_matches(["a", "...", "z"], "a\nz\n")
    assert not output_matches(["a", "z"], "a\nb\nz\n")
    assert not output_matches(["π ≈ 3..."], "π ≈ 2.9\n")


# --- the table of settings ---------------------------------------------------------------

def _table_text() -> str:
    return TABLE.read_text()


def test_every_bigexec_variable_the_package_reads_is_in_the_table() -> None:
    found: dict[str, str] = {}
    for source in sorted((ROOT / "bigexec").rglob("*.py")):
        for name in re.findall(r"BIGEXEC_[A-Z0-9_]+", source.read_text()):
            if not name.endswith("_"):  # a prefix (BIGEXEC_EC2_), written as BIGEXEC_EC2_<NAME>
                found.setdefault(name, str(source.relative_to(ROOT)))
    assert "BIGEXEC_SYSTEM" in found  # the grep itself works
    table = _table_text()
    missing = {n: where for n, where in found.items() if f"`{n}`" not in table}
    assert not missing, f"variables missing from {TABLE.relative_to(ROOT)}: {missing}"


def test_every_ec2_option_is_in_the_table_as_keyword_variable_and_file_key() -> None:
    table = _table_text()
    missing = []
    for f in dataclasses.fields(Ec2Options):
        variable = ENV_PREFIX + f.name.upper()
        row = next((line for line in table.splitlines() if f"`{variable}`" in line), None)
        if row is None or f"`{f.name}`" not in row:
            missing.append(f.name)
    assert not missing, f"ec2 options missing from {TABLE.relative_to(ROOT)}: {missing}"


# --- the README as the front page --------------------------------------------------------

def test_the_readme_s_links_into_the_docs_resolve() -> None:
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    assert len(links) >= 5
    broken = [link for link in links if not (ROOT / link).is_file()]
    assert not broken, f"README.md links to missing pages: {broken}"
