"""The docs site builds with ``mkdocs build --strict`` (what ``make docs`` runs): a link to a missing page, anchor
or image, or an API reference to a missing object, fails it; the README's own links lead somewhere; the pictures
stay small."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Markdown links and images with a relative target: (target path, anchor).
RELATIVE_LINK = re.compile(r"\]\((?![a-z]+:)([^)#\s]*)(?:#([^)\s]+))?\)")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=120)


def anchors(page: Path) -> set[str]:
    """The heading anchors of a Markdown page, as MkDocs' toc extension makes them."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)  # no "# comments"
    return {slugify(title, "-") for title in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


@pytest.mark.timeout(60)
def test_the_docs_build_strictly(tmp_path):
    run = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert run.returncode == 0, run.stderr[-3000:]
    # Each API page holds the docstrings of its module, not just its title.
    api = (tmp_path / "site/api/tasks/index.html").read_text()
    assert 'id="fishnet_pl.tasks.SegmentationHead"' in api and "Args:" not in api


@pytest.mark.parametrize(("broken", "named"), [("[the models](model.md)", "'model.md'"),
                                               ("[the weights](models.md#official-weight-by-name)", "#official-weight"),
                                               ("![a picture](images/no_such_picture.png)", "no_such_picture.png"),
                                               ("::: fishnet_pl.no_such_module", "fishnet_pl.no_such_module")])
def test_a_broken_link_or_reference_fails_the_build(broken, named, tmp_path):
    # A copy of the docs with one broken line, built with the real configuration (its
    # folders pointed at the copy and at the package).
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    for page in DOCS.rglob("*"):
        if page.is_file():
            (docs / page.relative_to(DOCS)).parent.mkdir(parents=True, exist_ok=True)
            (docs / page.relative_to(DOCS)).write_bytes(page.read_bytes())
    (docs / "index.md").write_text((docs / "index.md").read_text() + f"\n{broken}\n")
    config["docs_dir"] = str(docs)
    mkdocstrings = next(p["mkdocstrings"] for p in config["plugins"] if isinstance(p, dict) and "mkdocstrings" in p)
    mkdocstrings["handlers"]["python"]["paths"] = [str(ROOT)]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    run = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert run.returncode != 0 and named in run.stderr, run.stderr[-3000:]


def test_the_front_page_keeps_the_two_commands_and_its_links_lead_somewhere():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    links = RELATIVE_LINK.findall(readme)
    assert any(target.startswith("docs/images/") for target, _ in links)
    for target, anchor in links:
        assert (ROOT / target).is_file(), f"README.md links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(ROOT / target), f"README.md links to {target}#{anchor}: no such heading"


def test_every_picture_is_small_and_shown():
    pages = "\n".join(page.read_text() for page in DOCS.rglob("*.md"))
    pictures = sorted((DOCS / "images").glob("*.png"))
    assert pictures
    for picture in pictures:
        assert picture.stat().st_size < 150_000, f"{picture}: {picture.stat().st_size} bytes, keep it under 150 KB"
        assert f"images/{picture.name}" in pages, f"{picture} is on no page of docs/"
