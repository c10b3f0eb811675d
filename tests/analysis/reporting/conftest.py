"""The main job in the quick profile, run once per test session and shared by the tests that check its output
(tests/analysis/reporting/test_notebooks.py and test_browser.py)."""

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
# kept after the session, under reports/ (ignored by git): its index page links the browser test's screenshots
QUICK_REPORTS = REPO / "reports" / "test-quick"


@pytest.fixture(scope="session")
def quick_run():
    """(out_dir, parts): `reproduce(out_dir, profile="quick")` run once per session into reports/test-quick (or
    $SNAPKV_TEST_REPORTS), every part rerun; parts is reproduce's DataFrame, one row per part.
    SNAPKV_TEST_REPORTS=DIR SNAPKV_TEST_REUSE=1 checks the run already in DIR instead (parts from its run record)."""
    import pandas as pd

    from snapkv.analysis.reporting.notebooks import read_run_record
    from snapkv.analysis.reporting.reproduce import reproduce

    chosen = os.environ.get("SNAPKV_TEST_REPORTS")
    out = Path(chosen) if chosen else QUICK_REPORTS
    if chosen and os.environ.get("SNAPKV_TEST_REUSE") == "1":  # check an existing run's output without rerunning it
        record = read_run_record(out)
        parts = [{"part": name, "kind": kind[:-1], **entry} for kind in ("notebooks", "benchmarks")
                 for name, entry in record[kind].items()]
        return out, pd.DataFrame(parts)
    if not chosen and out.exists():
        shutil.rmtree(out)  # the test's own folder: nothing of an earlier session may pass for this one's output
    parts = reproduce(out, notebook_dir=REPO / "notebooks", profile="quick", force=True, progress=False)
    return out, parts
