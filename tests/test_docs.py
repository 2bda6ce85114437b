"""The docs site: the configuration reference is the code's, every key says what it does, the site builds
with `mkdocs build --strict` (a broken link, anchor or API reference fails), and the README stays short."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def docs_hooks():
    spec = importlib.util.spec_from_file_location("prefmill_docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_is_generated_from_the_code():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == docs_hooks().configuration_page(), "run `python docs/hooks.py` and commit docs/configuration.md"


def test_every_config_key_has_a_description():
    assert docs_hooks().undocumented_fields() == []


def test_the_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "fingerprint" in api and "build_stages" in api  # the API reference was rendered from the docstrings
    assert "fonts.googleapis.com" not in (tmp_path / "site" / "index.html").read_text()  # nothing fetched to read it


def test_the_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links and [link for link in links if not link.startswith("http") and not (REPO / link).exists()] == []
