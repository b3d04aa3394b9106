"""A report table as text: markdown (to read), LaTeX (to paste into a paper) and HTML (for `snakemake --report`),
from one set of formatted cells.

The renderers share `formatted`, so a number and its bold mark can never differ between the files.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import pandas as pd

# Characters of our labels that LaTeX needs spelled out (text mode; booktabs rules).
LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
         "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "→": r"$\rightarrow$",
         "Δ": r"$\Delta$", "–": "--", "‖": r"$\|$", "α": r"$\alpha$", "×": r"$\times$"}


@dataclass(frozen=True)
class Style:
    """How a table's numbers print. Metric columns are fractions printed as percentages with one decimal, the
    best of each (highest; a `chance` row never counts) in bold; `plain` columns print with four significant
    digits and are never bold; `signed_rows` (differences) print with a sign; `bold=False` marks nothing."""

    bold: bool = True
    plain: tuple[str, ...] = ()
    signed_rows: tuple = ()


def _number(value: float, percent: bool, signed: bool) -> str:
    if math.isnan(value):
        return "–"
    if percent:
        return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def formatted(table: pd.DataFrame, style: Style) -> list[tuple[str, list[tuple[str, bool]]]]:
    """[(row label, [(cell text, bold)])]: text columns as they are, numbers per `style`."""
    numbers = table.select_dtypes("number").drop(index="chance", errors="ignore")
    best = numbers.max(axis=0)
    rows = []
    for label, row in table.iterrows():
        cells = []
        for col, value in row.items():
            if col not in numbers.columns:
                cells.append(("" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value),
                              False))
                continue
            text = _number(value, col not in style.plain, label in style.signed_rows)
            marked = (style.bold and col not in style.plain and label != "chance" and len(numbers) > 1
                      and not math.isnan(value) and value == best[col])
            cells.append((text, marked))
        rows.append((str(label), cells))
    return rows


DEFAULT = Style()


def to_markdown(table: pd.DataFrame, style: Style = DEFAULT) -> str:
    header = f"| {table.index.name} | " + " | ".join(map(str, table.columns)) + " |"
    lines = [header, "|" + "---|" * (len(table.columns) + 1)]
    for label, cells in formatted(table, style):
        lines.append(f"| {label} | " + " | ".join(f"**{t}**" if b else t for t, b in cells) + " |")
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    return "".join(LATEX.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, title: str, style: Style = DEFAULT) -> str:
    """A booktabs `table` float (needs `\\usepackage{booktabs}`): text columns left-, numbers right-aligned."""
    numeric = set(table.select_dtypes("number").columns)
    spec = "l" + "".join("r" if col in numeric else "l" for col in table.columns)
    head = " & ".join(latex_escape(c) for c in [table.index.name or "", *table.columns])
    body = [" & ".join([latex_escape(label)] + [rf"\textbf{{{latex_escape(t)}}}" if b else latex_escape(t)
                                                 for t, b in cells]) + r" \\"
            for label, cells in formatted(table, style)]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(title)}}}",
                      rf"\begin{{tabular}}{{{spec}}}", r"\toprule", head + r" \\", r"\midrule", *body,
                      r"\bottomrule", r"\end{tabular}", r"\end{table}"]) + "\n"


def to_html(table: pd.DataFrame, title: str, style: Style = DEFAULT) -> str:
    """A standalone HTML page holding the table (what Snakemake's report shows in its viewer)."""
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in [table.index.name or "", *table.columns])
    rows = "".join(f"<tr><th>{esc(label)}</th>"
                   + "".join(f"<td><b>{esc(t)}</b></td>" if b else f"<td>{esc(t)}</td>" for t, b in cells) + "</tr>"
                   for label, cells in formatted(table, style))
    css = ("table{border-collapse:collapse;font:13px sans-serif}th,td{padding:3px 8px;border-bottom:1px solid #ccc}"
           "td{text-align:right}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{esc(title)}</title><style>{css}</style>"
            f"</head><body><h3>{esc(title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            "</body></html>\n")
