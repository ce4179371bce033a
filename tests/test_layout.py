"""The house rules that a change could silently break: one home per idea."""

import re
from pathlib import Path

from seerlib.methods import PRESETS

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "seerlib").rglob("*.py"))
# the Selection's options as code spells them (field names and forced-block rule names)
OPTIONS = ["row_floor", '"sink"', '"local"', '"last"', '"relative"', "forced=", "budget="]


def test_no_selection_option_is_named_in_more_than_two_modules():
    for option in OPTIONS:
        where = [p.relative_to(ROOT) for p in SOURCES if option in p.read_text()]
        assert len(where) <= 2, (option, where)


def test_the_recommended_configuration_is_spelled_in_one_source_file():
    label = PRESETS["recommended"].label
    files = [*SOURCES, *(ROOT / "bench").glob("*.py"), *(ROOT / "notebooks").glob("*.ipynb")]
    where = [p.relative_to(ROOT) for p in files if label in p.read_text()]
    assert len(where) <= 1, where


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_imports_are_at_the_top_unless_a_comment_says_why():
    for p in SOURCES:
        lines = p.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s+(from \S+ )?import ", line) and not line.lstrip().startswith("#"):
                context = " ".join(lines[max(0, i - 3):i + 1])
                assert "#" in context, f"{p.relative_to(ROOT)}:{i + 1}: {line.strip()}"


def test_the_repo_root_holds_no_package_but_seerlib():
    # `python -m` from the root puts it first on sys.path, where a folder named like a PyPI
    # package (kernels/ did, which transformers >= 5.25 imports) shadows the installed one
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages <= {"seerlib"}, packages
