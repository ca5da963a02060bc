"""README's results tables: the `make run` table has exactly the columns and stages the run prints
(its values depend on the CPU and are not checked), and every results table says which commit,
command and CPU produced it; docs/study.md's tables are what ``ltscale report`` renders from the
committed results."""

from __future__ import annotations

import re
from pathlib import Path

from ltscale.eval.evaluate import EvalSummary, format_table
from ltscale.run_config import load_config

REPO = Path(__file__).resolve().parents[2]


def _section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    level = heading.split(" ")[0]
    m = re.compile(rf"^#{{1,{len(level)}}} ", re.M).search(text, start + len(heading))
    return text[start : m.start() if m else len(text)]


def _tables(text: str) -> list[list[str]]:
    """Markdown tables as lists of their lines (header, separator, rows)."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    return tables + ([cur] if cur else [])


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_make_run_table_has_the_columns_and_stages_the_run_prints() -> None:
    cfg = load_config(None)  # what `make run` trains: configs/tiny.yaml
    summary = EvalSummary(n=cfg.data.synthetic.n_test, accuracy_official=0.5, accuracy_numeric=0.5,
                          mean_latent_tokens=1.0, mean_generated_tokens=50.0)  # fmt: skip
    # the trainer's print_results_table: one row per stage, {"stage", "mode", **summary}
    printed = format_table([{"stage": k, "mode": st.mode, **summary.to_dict()} for k, st in enumerate(cfg.stages, 1)])
    expected = [_cells(line) for line in printed.splitlines()]
    section = _section((REPO / "README.md").read_text(), "### The embedded default (`make run`)")
    table = next(t for t in _tables(section) if _cells(t[0])[:2] == ["stage", "mode"])
    assert _cells(table[0]) == expected[0], "README's make run table: columns differ from what the run prints"
    assert len(table) == len(expected), "README's make run table: not one row per stage of configs/tiny.yaml"
    for row, want in zip(table[2:], expected[2:]):
        assert _cells(row)[:3] == want[:3], "README's make run table: stage / mode / n differ from the run"


def test_every_readme_results_table_names_commit_command_and_cpu() -> None:
    results = _section((REPO / "README.md").read_text(), "## Results")
    blocks = re.split(r"^#{3,4} ", results, flags=re.M)[1:]
    assert blocks
    for block in blocks:
        title = block.splitlines()[0]
        if not _tables(block):
            continue
        for needle in ("commit", "CPU"):
            assert needle in block, f"README results '{title}': no {needle} named for its tables"
        assert re.search(r"`(make |ltscale |DS_ACCELERATOR|deepspeed |python )", block), (
            f"README results '{title}': no command given for its tables"
        )


def test_study_tables_are_what_report_renders_from_the_committed_results() -> None:
    """docs/study.md shows, for each budget, exactly what ``ltscale report results/study/<b>``
    prints from the committed per-run JSON: a table edited by hand or left stale by new results
    fails here."""
    from ltscale.eval.compare_results import load_compare_results, render_compare_report

    study = (REPO / "docs" / "study.md").read_text()
    budgets = sorted(p for p in (REPO / "results" / "study").iterdir() if p.is_dir())
    assert budgets, "results/study/ holds no budget"
    for budget in budgets:
        rendered = render_compare_report(load_compare_results(budget))
        for table in _tables(rendered):
            block = "\n".join(table)
            assert block in study, f"docs/study.md lacks (or has a stale copy of) this table of {budget.name}:\n{block}"
