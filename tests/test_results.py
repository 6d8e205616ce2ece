"""Every figure in the README's Results section comes from a results file a bench wrote.

* Each ``bench/results/*.md`` starts with ``Command: `...` `` (``bench/_common.emit``
  writes it): a command that runs a bench script of this repository, whose paths are
  all inside the repository, so the file can be reproduced from the repository alone.
  Observations that cannot be reproduced live under ``bench/results/one-off/``, which
  the README does not cite.
* Each number in the README's Results section (outside code spans) appears in some
  results file, at the README's precision: "0.967x" matches "0.967" or "0.9674", "79%"
  matches "79%" or "78.6%", "43k" matches "42943". A percentage matches percentages only.
* Each results file and bench script the Results section names exists.
"""

from __future__ import annotations

import re
import shlex
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RESULT_FILES = sorted(RESULTS.glob("*.md"))

# A number not glued to a word on its left (so "h100", "d4", "b4096" are names, not
# figures), with thousands commas, decimals, and a "%" or "k" suffix.
NUMBER = re.compile(r"(?<![\w.@/-])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(%|k\b)?")
CODE_SPAN = re.compile(r"`[^`]*`")


def _numbers(text: str) -> list[tuple[Decimal, int, str, str]]:
    """(value, decimals, unit, as written) of every number in ``text``; unit is "%" or ""
    ("k" is scaled out: 43k is 43000 to the nearest thousand, decimals -3)."""
    out = []
    for m in NUMBER.finditer(text):
        whole, frac, suffix = m.group(1).replace(",", ""), m.group(2) or "", m.group(3) or ""
        value = Decimal(whole + frac)
        decimals = len(frac) - 1 if frac else 0
        if suffix == "k":
            value, decimals = value * 1000, decimals - 3
        out.append((value, decimals, "%" if suffix == "%" else "", m.group(0)))
    return out


def _rounded(value: Decimal, decimals: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def results_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Results")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _first_line(path: Path) -> str:
    return path.read_text().split("\n", 1)[0]


def test_there_are_results_files():
    assert len(RESULT_FILES) >= 5


@pytest.mark.parametrize("path", RESULT_FILES, ids=[p.name for p in RESULT_FILES])
def test_results_file_starts_with_the_command_that_reproduces_it(path):
    first = _first_line(path)
    m = re.fullmatch(r"Command: `([^`]+)`", first)
    assert m, f"{path.name}: first line is not Command: `...`: {first!r}"
    words = shlex.split(m.group(1))
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment settings
        words.pop(0)
    assert words[:1] == [".venv/bin/python"], f"{path.name}: not run with the venv: {words}"
    script = words[1] if len(words) > 1 else ""
    assert re.fullmatch(r"bench/\w+\.py", script) and (REPO / script).is_file(), (
        f"{path.name}: {script!r} is not a bench script of this repository"
    )
    for word in words[2:]:
        value = word.split("=", 1)[1] if word.startswith("--") and "=" in word else word
        if "/" in value:  # a path: relative, inside the repository, and there
            relative = re.sub(r":\d+$", "", value)  # --dataset DIR:N takes N samples
            assert not relative.startswith(("/", "~")) and ".." not in relative.split("/"), (
                f"{path.name}: {value!r} is outside the repository"
            )
            assert (REPO / relative).exists(), f"{path.name}: {value!r} is not in the repository"


def test_numbers_are_read_at_their_precision():
    nums = _numbers("0.967x, 96%, 1.35x, 43k, 20,000 samples, h100 sim-h100-d4 b4096, 14.6 s")
    assert [(str(v), d, u) for v, d, u, _ in nums] == [
        ("0.967", 3, ""),
        ("96", 0, "%"),
        ("1.35", 2, ""),
        ("43000", -3, ""),
        ("20000", 0, ""),
        ("14.6", 1, ""),
    ]
    assert _rounded(Decimal("42943"), -3) == Decimal("43000")
    assert _rounded(Decimal("0.9674"), 3) == Decimal("0.967")


def test_every_results_figure_in_the_readme_is_in_a_results_file():
    found: dict[str, set[tuple[Decimal, int]]] = {"": set(), "%": set()}
    for path in RESULT_FILES:
        for value, decimals, unit, _ in _numbers(path.read_text()):
            found[unit].add((value, decimals))
    section = CODE_SPAN.sub(" ", results_section())
    missing = []
    for value, decimals, unit, written in _numbers(section):
        if not any(d >= decimals and _rounded(v, decimals) == value for v, d in found[unit]):
            missing.append(written)
    assert not missing, f"README Results figures found in no bench/results file: {missing}"


def test_results_files_and_benches_the_readme_names_exist():
    section = results_section()
    for name in set(re.findall(r"bench/[\w/]+\.(?:md|py)", section)):
        assert (REPO / name).is_file(), f"README names {name}, which does not exist"
    for name in set(re.findall(r"(?<![\w/])(\w+\.md)\b", section)):
        assert (RESULTS / name).is_file(), f"README names {name}, not in bench/results/"
