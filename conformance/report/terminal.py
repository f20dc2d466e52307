"""The report on the terminal: a rich table, one row per cell."""

from __future__ import annotations

from rich.markup import escape as rich_escape
from rich.table import Table

from .schema import MUTANT_STATUSES, STATUSES, MutationResult, Report, mutation_rows, mutation_summary
from .style import RICH


def summary_table(report: Report) -> Table:
    """One row per cell with coloured status counts, for the terminal."""
    table = Table(title=report.title)
    # A handover row's kernel column reads "handover 7.2.13 → 7.3.4": kept on one line.
    table.add_column("kernel", no_wrap=True)
    for col, justify in (("page shift", "right"), ("flavor", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in STATUSES:
        table.add_column(s, justify="right", style=RICH[s])
    for c in report.cells:
        n = c.counts()
        table.add_row(rich_escape(c.kernels), str(c.page_shift), rich_escape(c.flavor),
                      *(str(n[s]) if n[s] else "[dim]0[/dim]" for s in STATUSES))
    return table


def mutation_table(r: MutationResult) -> Table:
    """One row per mutated function: its mutants by status and its score."""
    table = Table(title=f"mutants of {r.kernel} ps{r.page_shift}", caption=mutation_summary(r))
    table.add_column("function", overflow="fold")
    for col in ("mutants", *MUTANT_STATUSES, "score"):
        table.add_column(col, justify="right")
    for f, n, score in mutation_rows(r):
        table.add_row(rich_escape(f), str(sum(n.values())), *(str(n[s]) if n[s] else "[dim]0[/dim]" for s in MUTANT_STATUSES),
                      score, style="bold" if f == "all" else None)
    return table
