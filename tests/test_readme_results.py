"""The README's offline-study table is the committed report's summary, number for number."""

import json
import re

from essa.report import summary_markdown, write_report
from tests.conftest import REPO

RESULTS = REPO / "docs" / "offline_study" / "results.json"


def _block(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"markers {name}:start/end not found"
    return match.group(1)


def test_readme_summary_is_the_reports_summary():
    results = json.loads(RESULTS.read_text())
    summary = summary_markdown(results)
    assert _block((REPO / "README.md").read_text(), "offline-study-summary").strip() == summary.strip()
    report = (RESULTS.parent / "report.md").read_text()
    assert summary.strip() in report  # and the committed report says the same
    datasets = [d["name"] for d in results["datasets"]]
    assert len(datasets) >= 3 and len(results["budget"]["seeds"]) >= 3
    for dataset in results["datasets"]:  # every cell finished every seed
        assert all(cell["status"] == "done" for cell in dataset["cells"]), dataset["name"]


def test_the_committed_report_is_what_write_report_renders_from_its_results(tmp_path):
    """docs/offline_study/report.md, rendered again from its results.json (written before the study recorded each
    cell's tuners beside its labels), byte for byte, with the same figures."""
    paths = write_report(json.loads(RESULTS.read_text()), tmp_path)
    assert paths["markdown"].read_text() == (RESULTS.parent / "report.md").read_text()
    assert sorted(p.name for p in paths["figures"]) == sorted(p.name for p in (RESULTS.parent / "figures").iterdir())
