"""The Sampling lab, its next-token explorer and the Insight tab in a real browser (Debian's Chromium through
Playwright) at 1400x1000, as a person sees them: nothing empty on show before a run, results that fit the page and
read on one line, a refused run that keeps the results before it, a sweep's chart, and an explorer chart in step
with its table after a token is appended.

Screenshots of each step are kept in a temporary folder, printed at the start (run with -s to see it).
"""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import Page, expect

from browser_support import TABS, browser_page, open_tab, page, playwright, screens, shot  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

# The settings table's columns, in order (playground.params.NUMERIC_FIELDS); the tests edit two of them.
TOP_P_COLUMN, MAX_TOKENS_COLUMN = 1, 7
SHORT_REPLIES = "6"  # new tokens per setting: enough to read, quick on a CPU


# ----------------------------------------------------------------------------------------------- helpers


def settings_cell(page: Page, row: int, column: int):
    return page.locator(f'#lab-settings [data-testid="cell-{row}-{column}"]')


def edit_setting(page: Page, row: int, column: int, value: str) -> None:
    """Type into a cell of the settings table as a person does: double-click, replace, Enter."""
    cell = settings_cell(page, row, column)
    cell.dblclick()
    box = cell.get_by_label("Edit cell")
    box.fill(value)
    box.press("Enter")
    expect(settings_cell(page, row, column).locator("span.text")).to_have_text(value)


def run_lab(page: Page, expected_status: str, timeout: float = 120_000) -> None:
    page.locator("#lab-run").click()
    expect(page.locator("#lab-status")).to_contain_text(expected_status, timeout=timeout)


def output_text(page: Page, number: int) -> str:
    return page.locator(f"#lab-output-{number} textarea").input_value()


def table_rows(page: Page, table_id: str) -> list[list[str]]:
    """The cells' text of a Gradio table's rendered rows (it draws only the rows in view)."""
    return page.evaluate(
        """id => Array.from(document.querySelectorAll(`#${id} [role=row].virtual-row`)).map(row =>
               Array.from(row.querySelectorAll('[role=gridcell] span.text')).map(cell => cell.textContent.trim()))""",
        table_id)


def table_headers(page: Page, table_id: str) -> list[str]:
    return [text.strip() for text in page.locator(f"#{table_id} th[role=columnheader] span.header").all_inner_texts()]


def explorer_accordion(page: Page):
    return page.get_by_role("button", name="Next-token explorer")


def overflow(page: Page, selector: str) -> int:
    """How many pixels an element's content sticks out sideways (0: it fits)."""
    return page.locator(selector).first.evaluate("e => e.scrollWidth - e.clientWidth")


def page_overflow(page: Page) -> int:
    return page.evaluate("document.scrollingElement.scrollWidth - document.scrollingElement.clientWidth")


def cut_headers(page: Page, table_id: str) -> list[str]:
    """The headers of a Gradio table that do not fit their column (shown cut, with an ellipsis)."""
    return page.evaluate(
        """id => Array.from(document.querySelectorAll(`#${id} th[role=columnheader] span.header`))
               .filter(span => span.scrollWidth > span.clientWidth + 1).map(span => span.textContent.trim())""",
        table_id)


def table_overflow(page: Page, table_id: str) -> int:
    """How many pixels a Gradio table's columns reach past its frame (it clips them rather than scrolling)."""
    return page.evaluate(
        """id => document.querySelector(`#${id} table.header-table`).getBoundingClientRect().width
               - document.querySelector(`#${id} .table-wrap`).clientWidth""",
        table_id)


def header_lines(page: Page, table_id: str) -> list[float]:
    """Each header's height in lines of its own text: 1 when it is not broken over lines."""
    return page.evaluate(
        """id => Array.from(document.querySelectorAll(`#${id} th[role=columnheader] span.header`)).map(span => {
               const style = getComputedStyle(span);
               const line = parseFloat(style.lineHeight) || parseFloat(style.fontSize) * 1.5;
               return span.getBoundingClientRect().height / line; })""",
        table_id)


def chart_labels(page: Page, chart_id: str) -> list[str]:
    """The x-axis labels of a Gradio (Vega) chart, left to right."""
    return page.evaluate(
        """id => Array.from(document.querySelectorAll(
                   `#${id} g.role-axis[aria-label^="X-axis"] g.role-axis-label text`))
               .map(text => [text.getBoundingClientRect().left, text.textContent])
               .sort((a, b) => a[0] - b[0]).map(pair => pair[1])""",
        chart_id)


def line_points(page: Page, plot_id: str) -> int:
    """Vertices of a line plot's lines (Vega draws each as an SVG path: M x,y L x,y ...)."""
    paths = page.locator(f"#{plot_id} g.mark-line path")
    return sum(len(re.findall(r"[ML]", path.get_attribute("d") or "")) for path in paths.all())


def readable_number(text: str) -> bool:
    """A number as people read it: at most 3 significant digits (no 0.36364579200744629)."""
    digits = re.sub(r"e.*$", "", text).lstrip("-").replace(".", "").lstrip("0")
    return bool(re.fullmatch(r"-?[\d.]+(e-\d+)?", text)) and len(digits) <= 3


# ------------------------------------------------------------------------------------------------- tests


def test_1_empty_parts_are_hidden_before_a_run(page, screens):
    expect(page.locator("#model-status")).to_contain_text("SmolLM2-135M-Instruct", timeout=30_000)
    open_tab(page, "Sampling lab")
    expect(page.locator("#lab-settings")).to_be_visible()
    for part in ("#lab-card-1", "#lab-output-1", "#lab-results", "#lab-csv", "#lab-sweep", "#lab-sweep-1"):
        expect(page.locator(part)).to_be_hidden()
    explorer_accordion(page).click()
    expect(page.locator("#explorer-go")).to_be_visible()
    for part in ("#explorer-chart", "#explorer-table"):
        expect(page.locator(part)).to_be_hidden()
    assert page_overflow(page) <= 0
    shot(page, screens, "lab-1-before-a-run")
    explorer_accordion(page).click()  # closed again for the steps below

    open_tab(page, "Insight")
    expect(page.locator("#insight-inspect")).to_be_visible()
    for part in ("#insight-token-table", "#insight-alternatives", "#insight-expert-load"):
        expect(page.locator(part)).to_be_hidden()
    page.locator("#insight-inspect").click()  # nothing to inspect yet: a message, still no empty tables
    expect(page.locator("#insight-heading")).to_contain_text("No chat replies to inspect yet")
    for part in ("#insight-token-table", "#insight-alternatives", "#insight-expert-load"):
        expect(page.locator(part)).to_be_hidden()
    shot(page, screens, "lab-1-insight-before")


def test_2_lab_results_fit_the_page_and_read_on_one_line(page, screens):
    open_tab(page, "Sampling lab")
    page.locator("#lab-prompt textarea").fill("Name a colour.")
    for row in (0, 1):
        edit_setting(page, row, MAX_TOKENS_COLUMN, SHORT_REPLIES)
    run_lab(page, "Done: 2 of 2 settings")
    expect(page.locator("#lab-results")).to_be_visible()
    expect(page.locator("#lab-csv a").first).to_be_visible()
    assert output_text(page, 1) and output_text(page, 2)
    # The two outputs share the width, side by side, each headed by what its setting changes.
    first, second = (page.locator(f"#lab-card-{n}").bounding_box() for n in (1, 2))
    assert abs(first["y"] - second["y"]) < 2 and min(first["width"], second["width"]) > 500, (first, second)
    expect(page.locator("#lab-output-1")).to_contain_text("Setting 1 · temperature 0")
    expect(page.locator("#lab-shared")).to_contain_text("Same in every setting")
    # Nothing sticks out sideways, and the results read on one line each.
    assert page_overflow(page) <= 0
    assert overflow(page, "#lab-results .table-wrap") <= 1 and table_overflow(page, "lab-results") <= 1
    headers = table_headers(page, "lab-results")
    assert headers[:2] == ["#", "settings"] and "output" in headers, headers
    assert max(header_lines(page, "lab-results")) < 1.5, dict(zip(headers, header_lines(page, "lab-results")))
    assert cut_headers(page, "lab-results") == []
    rows = table_rows(page, "lab-results")
    assert [row[1] for row in rows] == ["temperature 0", "temperature 0.7"]  # only what differs
    metrics = [headers.index(name) for name in ("tokens", "tok/s", "first token s", "total s", "mean logprob")]
    assert len(rows) == 2 and all(readable_number(row[index]) for row in rows for index in metrics), rows
    shot(page, screens, "lab-2-results")


def test_3_a_refused_run_keeps_the_results_before_it(page, screens):
    outputs = [output_text(page, 1), output_text(page, 2)]
    rows = table_rows(page, "lab-results")
    csv_name = page.locator("#lab-csv a").first.inner_text()
    edit_setting(page, 0, TOP_P_COLUMN, "2")
    run_lab(page, "setting 1: top_p", timeout=30_000)
    shot(page, screens, "lab-3-refused")
    # Only the status changed: outputs, results table and CSV are the previous run's.
    assert [output_text(page, 1), output_text(page, 2)] == outputs
    assert table_rows(page, "lab-results") == rows
    expect(page.locator("#lab-csv a").first).to_have_text(csv_name)
    # ... and the Insight tab still has that run's cells.
    open_tab(page, "Insight")
    page.get_by_label("Lab cell").check()
    page.locator("#insight-inspect").click()
    expect(page.locator("#insight-heading")).to_contain_text("Lab cell 2")
    expect(page.locator("#insight-token-table")).to_be_visible()
    expect(page.locator("#insight-routing-note")).to_contain_text("dense model")
    expect(page.locator("#insight-expert-load")).to_be_hidden()  # no empty plot under the note
    for table in ("insight-token-table", "insight-alternatives"):  # no column cut on the right
        assert overflow(page, f"#{table} .table-wrap") <= 1 and table_overflow(page, table) <= 1, table
        assert cut_headers(page, table) == [], table
    numbers = [cell for row in table_rows(page, "insight-token-table") for cell in row[3:5]]
    assert numbers and all(readable_number(cell) for cell in numbers), numbers
    assert page_overflow(page) <= 0
    shot(page, screens, "lab-3-insight-after-refusal")
    open_tab(page, "Sampling lab")
    edit_setting(page, 0, TOP_P_COLUMN, "0.9")


def test_4_a_sweep_draws_its_metrics(page, screens):
    page.locator("#lab-sweep-values textarea").fill("0, 0.7, 1.2")
    page.get_by_role("button", name="Fill table with sweep").click()
    expect(page.locator("#lab-status")).to_contain_text("Sweep of temperature")
    expect(settings_cell(page, 2, 0).locator("span.text")).to_have_text("1.2")
    run_lab(page, "Done: 3 of 3 settings")
    expect(page.locator("#lab-sweep")).to_be_visible()
    expect(page.locator("#lab-sweep-note")).to_contain_text("Sweep of temperature")
    for number in (1, 2, 3):  # tokens/s, new tokens, mean log-probability: three points each
        plot = f"lab-sweep-{number}"
        deadline = time.monotonic() + 15
        while line_points(page, plot) < 3:
            assert time.monotonic() < deadline, plot
            time.sleep(0.2)
        assert line_points(page, plot) == 3
    tops = {round(page.locator(f"#lab-card-{n}").bounding_box()["y"]) for n in (1, 2, 3)}
    assert len(tops) == 1  # three outputs on one row
    assert page_overflow(page) <= 0 and table_overflow(page, "lab-results") <= 1
    shot(page, screens, "lab-4-sweep")


def explorer_in_step(page: Page) -> tuple[list[str], list[str]]:
    """(chart labels, the table's rank-and-token) once they agree, or as they are after 15 s."""
    deadline = time.monotonic() + 15
    while True:
        labels = [label.rstrip("…") for label in chart_labels(page, "explorer-chart")]
        rows = [f"{int(row[0]):02d}. {row[1]}" for row in table_rows(page, "explorer-table")]
        shown = min(len(labels), len(rows))
        if shown >= 8 and all(row.startswith(label) for label, row in zip(labels, rows)):
            return labels[:shown], rows[:shown]
        if time.monotonic() > deadline:
            return labels, rows
        time.sleep(0.25)


def test_5_explorer_chart_stays_in_step_with_its_table(page, screens):
    open_tab(page, "Sampling lab")
    explorer_accordion(page).click()
    page.get_by_role("button", name="Use the lab prompt (chat format)").click()
    expect(page.locator("#explorer-text textarea")).to_have_value(re.compile(re.escape("<|im_start|>assistant")))
    page.locator("#explorer-go").click()
    expect(page.locator("#explorer-summary")).to_contain_text("tokens are kept", timeout=60_000)
    labels, rows = explorer_in_step(page)
    assert all(row.startswith(label) for label, row in zip(labels, rows)) and len(labels) >= 8, (labels, rows)
    before = rows
    shot(page, screens, "lab-5-explorer")

    # Append through the list and button: table, summary and chart all move on.
    page.locator("#explorer-choice input").click()
    page.get_by_role("option").nth(1).click()
    page.locator("#explorer-append").click()
    deadline = time.monotonic() + 60
    while [f"{int(row[0]):02d}. {row[1]}" for row in table_rows(page, "explorer-table")][:3] == before[:3]:
        assert time.monotonic() < deadline, "the table did not move on"
        time.sleep(0.25)
    labels, rows = explorer_in_step(page)
    assert rows != before and all(row.startswith(label) for label, row in zip(labels, rows)), (labels, rows)
    shot(page, screens, "lab-5-explorer-appended")

    # And through a click on a table row.
    before = rows
    page.locator('#explorer-table [data-testid="cell-1-1"]').click()
    deadline = time.monotonic() + 60
    while [f"{int(row[0]):02d}. {row[1]}" for row in table_rows(page, "explorer-table")][:3] == before[:3]:
        assert time.monotonic() < deadline, "the table did not move on"
        time.sleep(0.25)
    labels, rows = explorer_in_step(page)
    assert all(row.startswith(label) for label, row in zip(labels, rows)), (labels, rows)
    numbers = [cell for row in table_rows(page, "explorer-table") for cell in row[3:5]]
    assert numbers and all(readable_number(cell) for cell in numbers), numbers
    assert table_overflow(page, "explorer-table") <= 1 and cut_headers(page, "explorer-table") == []
    assert page_overflow(page) <= 0
    shot(page, screens, "lab-5-explorer-row-appended")
