"""Make plots/offline.html: the page template of `dvc plots show`/`diff`, carrying the Vega libraries inline.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so its charts are blank without a network. This
script installs the versions pinned in plots/package.json (exactly as plots/package-lock.json records them, with
their integrity hashes) from the npm registry into a temporary folder, puts their browser builds into
plots/page.html, and writes the licence of every package installed with them to plots/THIRD_PARTY_LICENSES.txt.

Run it after changing page.html or a version in package.json (then `npm install --package-lock-only` in plots/ to
update the lock). It needs Node.js and npm; nothing else in the project does.

    python plots/vendor.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = HERE / "page.html"
TEMPLATE = HERE / "offline.html"
LICENCES = HERE / "THIRD_PARTY_LICENSES.txt"
PLACEHOLDER = "{vega_libraries}"
# The browser build of each library, in the order the page must load them (Vega-Embed needs the other two).
BUILDS = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js", "vega-embed": "build/vega-embed.min.js"}
# Packages of the Vega monorepo ship without a licence file; the monorepo's licence is the one its other
# packages carry (vega-view's, identical in all of them).
MONOREPO_LICENCE_FROM = "vega-view"


def script_tag(name: str, version: str, code: str) -> str:
    if "</script" in code.lower():
        raise SystemExit(f"{name}@{version}: its build contains '</script', which would end the inline script")
    return f'<script data-library="{name}@{version}">{code}</script>'


def installed_version(modules: Path, name: str) -> str:
    return json.loads((modules / name / "package.json").read_text(encoding="utf-8"))["version"]


def licence_text(modules: Path, package: Path) -> str:
    for candidate in sorted(package.iterdir()):
        if candidate.name.lower().startswith(("license", "licence", "copying")) and candidate.is_file():
            return candidate.read_text(encoding="utf-8").strip()
    if package.name.startswith("vega"):
        return licence_text(modules, modules / MONOREPO_LICENCE_FROM)
    return "(the package ships no licence file; its package.json names the licence above)"


def third_party_licences(modules: Path) -> str:
    sections = [
        "Licences of the JavaScript packages carried by plots/offline.html: Vega, Vega-Lite and Vega-Embed, and every\n"
        "package npm installs with them (their browser builds bundle a part of these).\n"
    ]
    lock = json.loads((HERE / "package-lock.json").read_text(encoding="utf-8"))
    packages = [modules.parent / key for key in sorted(lock["packages"]) if key and (modules.parent / key).is_dir()]
    for package in packages:
        meta = json.loads((package / "package.json").read_text(encoding="utf-8"))
        name, version, spdx = meta["name"], meta["version"], meta.get("license", "unknown")
        sections.append(f"{'=' * 100}\n{name}@{version} ({spdx})\n{'=' * 100}\n{licence_text(modules, package)}\n")
    return "\n".join(sections)


def main() -> None:
    if shutil.which("npm") is None:
        sys.exit("npm is not installed: it fetches the pinned Vega libraries from the npm registry")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(HERE / name, work / name)
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=work, check=True)
        modules = work / "node_modules"
        tags = []
        for name, build in BUILDS.items():
            version = installed_version(modules, name)
            tags.append(script_tag(name, version, (modules / name / build).read_text(encoding="utf-8")))
        page = PAGE.read_text(encoding="utf-8")
        if page.count(PLACEHOLDER) != 1:
            sys.exit(f"{PAGE} must contain {PLACEHOLDER} exactly once")
        TEMPLATE.write_text(page.replace(PLACEHOLDER, "\n    ".join(tags)), encoding="utf-8")
        LICENCES.write_text(third_party_licences(modules), encoding="utf-8")
    print(f"wrote {TEMPLATE.name} ({TEMPLATE.stat().st_size // 1024} KiB) and {LICENCES.name}")


if __name__ == "__main__":
    main()
