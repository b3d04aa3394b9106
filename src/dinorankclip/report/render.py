"""A report table as text: markdown (to read), LaTeX (to paste into a paper) and HTML (for `snakemake --report`),
from one set of formatted cells.

The renderers share `formatted`, so a number, its interval and its marks can never differ between the files. A cell
prints as `mean ± half-width` (the 95% t-interval over seeds; the mean alone with one seed), `*` marks a difference
that a declared comparison found significant, and bold marks a cell significantly better than its reference(s) —
never merely the largest number.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import pandas as pd

from dinorankclip.report.tables import SEEDS, Table

# Characters of our labels that LaTeX needs spelled out (text mode; booktabs rules).
LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
         "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "→": r"$\rightarrow$",
         "Δ": r"$\Delta$", "–": "--", "‖": r"$\|$", "α": r"$\alpha$", "×": r"$\times$", "±": r"$\pm$",
         "γ": r"$\gamma$", "∠": r"$\angle$", "°": r"$^\circ$", "′": r"$'$", "≥": r"$\geq$", "|": r"$|$",
         "μ": r"$\mu$", "−": "-"}


@dataclass(frozen=True)
class Style:
    """How a table's numbers print. Metric columns are fractions printed as percentages with one decimal; `plain`
    columns print with four significant digits; the `seeds` column as an integer; `signed_rows` (differences)
    print with a sign."""

    plain: tuple[str, ...] = ()
    signed_rows: tuple = ()


def _number(value: float, percent: bool, signed: bool) -> str:
    if math.isnan(value):
        return "–"
    if percent:
        return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _interval(value: float, percent: bool) -> str:
    return "" if math.isnan(value) else f" ± {100 * value:.1f}" if percent else f" ± {value:.2g}"


def formatted(table: Table, style: Style) -> list[tuple[str, list[tuple[str, bool]]]]:
    """[(row label, [(cell text, bold)])]: text columns as they are, numbers per `style` with their interval and
    marks."""
    numbers = set(table.values.select_dtypes("number").columns)
    rows = []
    for label, row in table.values.iterrows():
        cells = []
        for col, value in row.items():
            if col == SEEDS:
                cells.append(("" if pd.isna(value) else str(int(value)), False))
            elif col not in numbers:
                cells.append(("" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value),
                              False))
            else:
                percent = col not in style.plain
                half = table.intervals.at[label, col] if (label in table.intervals.index
                                                          and col in table.intervals.columns) else math.nan
                text = _number(value, percent, label in style.signed_rows)
                if not math.isnan(value):
                    text += _interval(half, percent)
                if (label, col) in table.significant:
                    text += "*"
                cells.append((text, (label, col) in table.better))
        rows.append((str(label), cells))
    return rows


DEFAULT = Style()


def to_markdown(table: Table, style: Style = DEFAULT) -> str:
    values = table.values
    header = f"| {values.index.name} | " + " | ".join(map(str, values.columns)) + " |"
    lines = [header, "|" + "---|" * (len(values.columns) + 1)]
    for label, cells in formatted(table, style):
        lines.append(f"| {label} | " + " | ".join(f"**{t}**" if b else t for t, b in cells) + " |")
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    return "".join(LATEX.get(ch, ch) for ch in str(text))


def to_latex(table: Table, title: str, style: Style = DEFAULT) -> str:
    """A booktabs `table` float (needs `\\usepackage{booktabs}`): text columns left-, numbers right-aligned."""
    values = table.values
    numeric = set(values.select_dtypes("number").columns)
    spec = "l" + "".join("r" if col in numeric else "l" for col in values.columns)
    head = " & ".join(latex_escape(c) for c in [values.index.name or "", *values.columns])
    body = [" & ".join([latex_escape(label)] + [rf"\textbf{{{latex_escape(t)}}}" if b else latex_escape(t)
                                                 for t, b in cells]) + r" \\"
            for label, cells in formatted(table, style)]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(title)}}}",
                      rf"\begin{{tabular}}{{{spec}}}", r"\toprule", head + r" \\", r"\midrule", *body,
                      r"\bottomrule", r"\end{tabular}", r"\end{table}"]) + "\n"


def to_html(table: Table, title: str, style: Style = DEFAULT) -> str:
    """A standalone HTML page holding the table (what Snakemake's report shows in its viewer)."""
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in [table.values.index.name or "", *table.values.columns])
    rows = "".join(f"<tr><th>{esc(label)}</th>"
                   + "".join(f"<td><b>{esc(t)}</b></td>" if b else f"<td>{esc(t)}</td>" for t, b in cells) + "</tr>"
                   for label, cells in formatted(table, style))
    css = ("table{border-collapse:collapse;font:13px sans-serif}th,td{padding:3px 8px;border-bottom:1px solid #ccc}"
           "td{text-align:right}")
    caption = esc(title).replace("\n", "<br>")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{esc(title.splitlines()[0])}</title>"
            f"<style>{css}</style></head><body><h3>{caption}</h3><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table></body></html>\n")
