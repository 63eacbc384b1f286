"""The offline page template of `dvc plots`: made from plots/page.html and the pinned Vega libraries, and used."""

from __future__ import annotations

import configparser
import json
import re

from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
PLOTS = ROOT / "plots"
LIBRARY = re.compile(r'<script data-library="(?P<name>[^"@]+)@(?P<version>[^"]+)">.*?</script>', re.DOTALL)


def test_the_template_is_the_page_with_the_pinned_libraries_inline():
    template = (PLOTS / "offline.html").read_text(encoding="utf-8")
    libraries = [(m["name"], m["version"]) for m in LIBRARY.finditer(template)]
    lock = json.loads((PLOTS / "package-lock.json").read_text(encoding="utf-8"))["packages"]
    pinned = json.loads((PLOTS / "package.json").read_text(encoding="utf-8"))["dependencies"]
    assert [name for name, _ in libraries] == ["vega", "vega-lite", "vega-embed"]  # the order they need
    for name, version in libraries:
        assert version == pinned[name] == lock[f"node_modules/{name}"]["version"]
    blocks = "\n    ".join(m[0] for m in LIBRARY.finditer(template))
    assert template.replace(blocks, "{vega_libraries}") == (PLOTS / "page.html").read_text(encoding="utf-8")


def test_the_template_fetches_nothing_and_has_dvcs_placeholder():
    template = (PLOTS / "offline.html").read_text(encoding="utf-8")
    page = LIBRARY.sub("", template)
    assert template.count("{plot_divs}") == 1
    assert not re.search(r"<(script|link)[^>]+(src|href)=", page), "the page must not load anything"
    assert "{scripts}" not in template  # where DVC would put its CDN <script> tags


def test_dvc_is_configured_to_use_it():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    template = (ROOT / ".dvc" / config["plots"]["html_template"]).resolve()  # DVC resolves it from .dvc/
    assert template == (PLOTS / "offline.html").resolve()


def test_every_package_of_the_lock_has_its_licence_recorded():
    licences = (PLOTS / "THIRD_PARTY_LICENSES.txt").read_text(encoding="utf-8")
    lock = json.loads((PLOTS / "package-lock.json").read_text(encoding="utf-8"))["packages"]
    for key, meta in lock.items():
        if key and not meta.get("optional"):
            name = key.rsplit("node_modules/", 1)[1]
            assert f"\n{name}@{meta['version']} (" in licences, name
