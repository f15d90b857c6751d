"""The MLflow UI in a real browser: `mlflow server` on 127.0.0.1 over a store holding train,
evaluate and tune runs made by the CLI; Debian's headless Chromium, driven by Playwright, selects
the runs, opens the compare view and finds their names, `val/lddt` values and `optim.lr` there.

The screenshot of the compare view is kept in ``test-artifacts/mlflow-compare.png`` (or in the
folder named by ``DIFFOLD_TEST_ARTIFACTS``). `.ci/run` installs Chromium with apt-get; the test
skips, naming what is missing, only where Chromium or Playwright is not installed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import free_port
from pipeline.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 60_000
TINY = [
    "--scenario", "debug",
    "--set", "data.n_train=8",
    "--set", "data.n_val=2",
    "--set", "trainer.epochs=1",
    "--set", "trainer.val_max_structures=2",
    "--set", "tracking.system_metrics=false",
]
#: Two training runs that differ in one parameter, so the compare view has something to show.
LEARNING_RATES = {"ui-train-lr3e-4": "0.0003", "ui-train-lr1e-3": "0.001"}


@pytest.fixture(scope="module")
def playwright_api():
    """Playwright's sync API, once Chromium and Playwright are both there."""
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} "
                    "(.ci/run installs it with `apt-get install chromium`)")
    module = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')"
    )
    return module


@pytest.fixture(scope="module")
def store(tmp_path_factory, one_intra_op_thread):
    """A sqlite store with two train runs, one evaluate run and a one-trial tune study."""
    path = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)  # the runs' artifacts go to ./mlruns here
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        for name, lr in LEARNING_RATES.items():
            assert main(["train", *TINY, "--set", f"optim.lr={lr}",
                         "--set", f"tracking.run_name={name}",
                         "--set", f"output_dir={path / name}"]) == 0
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("diffold").experiment_id
        first_name = next(iter(LEARNING_RATES))
        (first,) = client.search_runs(
            [experiment], filter_string=f"attributes.run_name = '{first_name}'"
        )
        assert main(["evaluate", "--run-id", first.info.run_id, "--n-samples", "1",
                     "--output", str(path / "eval.csv")]) == 0
        assert main(["tune", "--n-trials", "1", *TINY, "--study-name", "ui",
                     "--set", f"output_dir={path / 'tune'}"]) == 0
    runs = client.search_runs([experiment])
    roles = sorted(r.data.tags.get("role", "train") for r in runs)
    assert roles == ["evaluate", "train", "train", "train", "tune-parent"]
    return path, uri, experiment, runs



def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the process group; False when no process is left in it."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def _stop_group(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM the process group ``process`` leads and wait until it is empty: the job consumers
    of `mlflow server` take a few seconds longer than their parent. SIGKILL what is left."""
    _signal_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while process.poll() is None or _signal_group(process.pid, 0):
        if time.monotonic() > deadline:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)
            return
        time.sleep(0.2)


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, (
            f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, f"mlflow server did not answer within {timeout_s} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(store):
    """`mlflow server` on 127.0.0.1 over the store; its base URL. Always stopped afterwards."""
    path, uri, _, _ = store
    port = free_port()
    log = path / "server.log"
    with log.open("w") as out:
        # A process group of its own: `mlflow server` starts uvicorn and a job runner with
        # consumers, and stopping the group stops them all.
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
             "--artifacts-destination", str(path / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=path, start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_up(url, process, log)
            yield url
        finally:
            _stop_group(process)


def _screenshot_path(name: str) -> Path:
    folder = Path(os.environ.get("DIFFOLD_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _select_runs(page, names: list[str], parent_name: str) -> None:
    """Tick each run's checkbox in the runs table; the tune trial sits under its parent."""
    def row(name):
        link = page.get_by_role("link", name=name, exact=True)
        return page.get_by_role("row").filter(has=link)

    row(parent_name).get_by_role("link").wait_for()
    missing = [n for n in names if not page.get_by_role("link", name=n, exact=True).is_visible()]
    if missing:  # children are collapsed under their parent run: expand it
        row(parent_name).get_by_role("button").first.click()
    for name in names:
        row(name).get_by_role("checkbox", name=re.compile("row selection")).check()


def _scroll_metric_into_view(page, key: str):
    """The metrics table is virtualised: wheel over its values grid (the names grid follows)
    until the metric's row is shown whole; returns the metric's link."""
    names, values = page.get_by_role("grid").nth(0), page.get_by_role("grid").nth(1)
    link = page.get_by_role("link", name=key, exact=True)

    def shown_whole() -> bool:
        row, grid = link.bounding_box(), names.bounding_box()
        return bool(row) and grid["y"] <= row["y"] <= grid["y"] + grid["height"] - row["height"]

    values.hover()
    for _ in range(200):
        if link.count() and shown_whole():
            break
        page.mouse.wheel(0, 45)
        page.wait_for_timeout(50)
    else:
        pytest.fail(f"metric {key!r} not found in the compare view's metrics table")
    # MLflow 3.17's names grid takes the scroll offset of the event before the last one, so it
    # trails the values by one wheel step: one more pixel down and back up brings it level.
    page.mouse.wheel(0, 1)
    page.wait_for_timeout(50)
    page.mouse.wheel(0, -1)
    page.wait_for_function(
        "([a, b]) => Math.abs(a.scrollTop - b.scrollTop) <= 1",
        arg=[names.element_handle(), values.element_handle()], timeout=TIMEOUT_MS,
    )
    assert shown_whole(), f"metric {key!r} scrolled out of sight"
    return link


def _metric_values(page, link) -> list[str]:
    """The values shown on the metric's row, left to right (one per run)."""
    box = link.bounding_box()
    middle = box["y"] + box["height"] / 2
    return page.get_by_role("grid").nth(1).evaluate(
        """(grid, y) => [...grid.querySelectorAll('[role=rowgroup] > div')]
            .map(cell => [cell.getBoundingClientRect(), cell.innerText.trim()])
            .filter(([r]) => r.top <= y && y <= r.bottom)
            .sort(([a], [b]) => a.left - b.left)
            .map(([, text]) => text)""",
        middle,
    )


def test_compare_view_shows_the_runs_their_val_lddt_and_params(playwright_api, server, store):
    _, _, experiment, runs = store
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == len(names), names  # rows are found by run name
    parent_name = next(r.info.run_name for r in runs if r.data.tags.get("role") == "tune-parent")
    by_id = {r.info.run_id: r for r in runs}
    expect = playwright_api.expect

    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page.goto(f"{server}/#/experiments/{experiment}/runs")
            _select_runs(page, names, parent_name)
            page.get_by_role("button", name="Compare", exact=True).click()
            expect(page.get_by_role("heading", name=re.compile(r"Comparing 5 Runs"))).to_be_visible()

            # Room for the tables: the side panel on the right closed, the plots folded away.
            close = page.get_by_role("button", name="Close", exact=True)
            if close.count() == 1:
                close.click()
            page.get_by_role("button", name="Visualizations", expanded=True).click()

            # Columns follow the Run ID row; each run's name heads its column.
            run_ids = page.get_by_role("row").filter(
                has=page.get_by_role("rowheader", name="Run ID:")
            ).get_by_role("link")
            expect(run_ids).to_have_count(len(runs))
            columns = [by_id[run_id] for run_id in run_ids.all_inner_texts()]
            run_names = page.get_by_role("row").filter(
                has=page.get_by_role("rowheader", name="Run Name:")
            ).get_by_role("cell")
            expect(run_names).to_have_text([r.info.run_name for r in columns])

            # Show the whole view, then bring the rows the assertions read into sight.
            height = page.get_by_role("main").evaluate("main => main.scrollHeight")
            page.set_viewport_size({"width": 1600, "height": max(1000, height + 40)})
            lr_row = page.get_by_role("row").filter(
                has=page.get_by_role("rowheader", name="optim.lr", exact=True)
            )
            lr_row.scroll_into_view_if_needed()
            expect(lr_row).to_be_in_viewport()
            expect(lr_row.get_by_role("cell")).to_have_text(
                [r.data.params.get("optim.lr", "") for r in columns]
            )
            assert {r.data.params.get("optim.lr") for r in columns} >= set(LEARNING_RATES.values())

            lddt = _scroll_metric_into_view(page, "val/lddt")
            expect(lddt).to_be_in_viewport()
            shown = _metric_values(page, lddt)
            assert len(shown) == len(columns), shown
            n_with_lddt = 0
            for run, text in zip(columns, shown):
                value = run.data.metrics.get("val/lddt")
                if value is not None:  # the tune parent logs no val/lddt of its own
                    n_with_lddt += 1
                    assert float(text) == pytest.approx(value, abs=5e-4), (run.info.run_name, text)
            assert n_with_lddt == 4  # two train runs, the evaluate run, the tune trial

            page.screenshot(path=str(_screenshot_path("mlflow-compare.png")), full_page=True)
        except BaseException:
            # Where it stopped, for the CI artifacts.
            page.screenshot(path=str(_screenshot_path("mlflow-compare-failed.png")), full_page=True)
            raise
        finally:
            browser.close()
