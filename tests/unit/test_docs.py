"""The docs' figures of the committed results are the committed results: a rerun that changes the digits fails here
until the docs say the new ones."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import REPO_ROOT

COMMITTED = json.loads((REPO_ROOT / "reports/metrics.json").read_text())


@pytest.mark.parametrize(
    ("doc", "pattern"),
    [
        ("README.md", r"the committed `dvc.lock` is from [^%]*?(?P<accuracy>\d\d\.\d\d)%"),
        (
            "docs/pipeline.md",
            r"The committed `dvc.lock` came from [^%]*?(?P<accuracy>\d\d\.\d\d)%, robust (?P<robust>\d\d\.\d\d)%",
        ),
        ("docs/reproducibility.md", r"The committed results.*?(?P<accuracy>\d\d\.\d\d)%, test loss (?P<loss>0\.\d{6})"),
    ],
)
def test_the_docs_quote_the_committed_results(doc, pattern):
    found = re.search(pattern, " ".join((REPO_ROOT / doc).read_text().split()), re.S)
    assert found, f"{doc} no longer quotes the committed results where this test looks"
    assert found["accuracy"] == f"{100 * COMMITTED['test_accuracy']:.2f}", doc
    if "robust" in found.groupdict():
        assert found["robust"] == f"{100 * COMMITTED['robust_accuracy']:.2f}", doc
    if "loss" in found.groupdict():
        assert found["loss"] == f"{COMMITTED['test_loss']:.6f}", doc
