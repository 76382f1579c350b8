"""The import packages must be this repository's, not same-named packages from elsewhere."""

from pathlib import Path

import evaluators
import merging
import search
from tests.support.runs import REPO


def test_packages_come_from_this_repository():
    for module in (search, evaluators, merging):
        origin = Path(module.__file__).resolve()
        assert origin.parent.parent == REPO, f"{module.__name__} imported from {origin}"


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("basin") == "search.cli:main"


def test_the_readme_images_exist_and_are_png():
    import re

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (REPO / "README.md").read_text())
    assert links, "the README shows the demo's Pareto picture"
    for link in links:
        assert not link.startswith(("http:", "https:")), link
        assert (REPO / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
