"""The documentation ships with the code: every document a file cites exists, nothing cites the
design notes that do not ship, and the docs' hyper-parameter tables are the config fields' own."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

import commhooks
from recipes import cli
from recipes.cifar import RECIPE as CIFAR
from recipes.mnist import RECIPE as MNIST

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# One page per algorithm family: every algorithm is on one.
PAGES = {"ssgd": "synchronous.md", "ssgd-noise": "synchronous.md", "cpsgd": "periodic.md",
         "adpsgd": "periodic.md", "diloco": "periodic.md", "slowmo": "periodic.md", "dpsgd": "gossip.md", "easgd": "elastic.md",
         "entropysgd": "parle.md", "parle": "parle.md"}
# Documents that do not ship with the repository (design notes, paper collections).
FORBIDDEN = re.compile(r"ALGORITHMS\.md|PITFALLS\.md|DESIGN\.md|\bshared/|\bseeds?[ /]0\d\d", re.IGNORECASE)
# A path to a document: `docs/x.md`, `README.md`, `../README.md`, `docs/` ...
DOC_PATH = re.compile(r"(?<![\w/.:-])((?:\.\./|\./)?(?:[\w.-]+/)*[\w.-]+\.md|docs/)(?:#([\w-]+))?")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
# Markdown files that tools write (outputs named in their help), not documents to cite.
OUTPUTS = {"compare.md", "FILE.md", "results.md"}


def _shipped_files() -> list[Path]:
    """The repository's .md and .py files (tracked or new, not ignored), but this checker's own
    file, whose probe strings are broken citations on purpose."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [(ROOT / f).resolve() for f in out.splitlines() if f.endswith((".md", ".py"))]
    return [f for f in files if f.is_file() and f != Path(__file__).resolve()]


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", page.read_text(), re.MULTILINE)}


def _references(text: str, markdown: bool) -> list[tuple[str, str | None]]:
    """(target, anchor) of every document a text cites: Markdown links and bare paths."""
    refs = []
    if markdown:
        for target in MD_LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            file, _, anchor = target.partition("#")
            refs.append((file, anchor or None))
        text = MD_LINK.sub("]", text)
    refs += [(m.group(1), m.group(2)) for m in DOC_PATH.finditer(text)]
    return refs


def _resolve(source: Path, target: str) -> Path | None:
    """A cited document: relative to the citing file (Markdown links), else to the repository."""
    if not target:
        return source
    for base in (source.parent, ROOT):
        candidate = (base / target).resolve()
        if candidate.exists() and (candidate == ROOT or ROOT in candidate.parents):
            return candidate
    return None


def test_every_cited_document_exists():
    missing = []
    checked = 0
    for path in _shipped_files():
        for target, anchor in _references(path.read_text(), markdown=path.suffix == ".md"):
            if target in OUTPUTS:
                continue
            found = _resolve(path, target)
            checked += 1
            where = f"{path.relative_to(ROOT)} cites {target}{'#' + anchor if anchor else ''}"
            if found is None:
                missing.append(where)
            elif anchor and found.suffix == ".md" and anchor not in _anchors(found):
                missing.append(where + " (no such heading)")
    assert checked > 50  # the scan does see the citations
    assert not missing, "\n".join(missing)


def test_nothing_cites_files_that_do_not_ship():
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for p in _shipped_files()
            for n, line in enumerate(p.read_text().splitlines(), 1) if FORBIDDEN.search(line)]
    assert not hits, "\n".join(hits)


def test_the_checks_catch_what_they_should():
    """The patterns find a broken citation, a forbidden one and an anchor (else the tests above pass vacuously)."""
    refs = _references("see docs/nowhere.md and [x](gossip.md#the-rule), `README.md`", markdown=True)
    assert refs == [("gossip.md", "the-rule"), ("docs/nowhere.md", None), ("README.md", None)]
    page = DOCS / "README.md"
    assert _resolve(page, "docs/nowhere.md") is None and _resolve(page, "gossip.md") is not None
    assert FORBIDDEN.search("as ALGORITHMS.md says") and FORBIDDEN.search("seed 002, eq. 2")
    assert _slug("The rule (Zhang et al., eq. 2)") == "the-rule-zhang-et-al-eq-2"


def test_readme_links_the_docs_and_the_index_links_every_page():
    assert "docs/README.md" in (ROOT / "README.md").read_text()
    index = (DOCS / "README.md").read_text()
    for page in sorted(set(PAGES.values()) | {"metrics.md", "recipes.md", "usage.md"}):
        assert f"]({page})" in index, page


@pytest.mark.parametrize("algo", commhooks.ALGORITHMS)
def test_algorithm_pages_hold_the_generated_tables(algo):
    """Each page embeds ``cli.hparam_markdown(algo)`` verbatim (the fields' own documentation),
    names the algorithm, its paper's arXiv or OpenReview id, and the equation or algorithm."""
    page = (DOCS / PAGES[algo]).read_text()
    assert f"`{algo}`" in page
    assert re.search(r"arXiv\s+\d{4}\.\d{5}|OpenReview\s+\w+", page)
    assert re.search(r"(eq\.|Algorithm|Sections?) \d", page)
    tables = dict(re.findall(r"<!-- hparams ([\w-]+) -->\n(.*?)<!-- /hparams -->", page, re.DOTALL))
    common = {f.name for f in dataclasses.fields(commhooks.config.CommonConfig)}
    own = [doc for doc in commhooks.config.hparam_docs(algo) if doc.name not in common]
    if not own:
        return
    expected = cli.hparam_markdown(algo)
    assert tables.get(algo) == expected, f"regenerate the table of {algo} in docs/{PAGES[algo]}:\n{expected}"


def test_common_options_table_is_generated():
    index = (DOCS / "README.md").read_text()
    table = re.search(r"<!-- hparams common -->\n(.*?)<!-- /hparams -->", index, re.DOTALL)
    assert table and table.group(1) == cli.hparam_markdown("ssgd", common=True)


def test_recipes_page_mentions_every_flag():
    page = (DOCS / "recipes.md").read_text()
    algo_flags = {f"--{no}{n.replace('_', '-')}" for n in cli.hparam_fields() for no in ("", "no-")}
    for recipe in (MNIST, CIFAR):
        for action in cli.options(cli.build_parser(recipe)):
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in algo_flags | {"--help"}:
                    assert flag in page, flag
