"""Report tables from evaluation JSONs with known numbers: every table's cells, ordering and bold marks, exactly,
in CSV, markdown and LaTeX; the matched-compute column; figures written as PNG and PDF."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from dinorankclip.report.build import ReportSpec, build_report
from dinorankclip.report.figures import classical_mds
from dinorankclip.report.render import Style, to_latex, to_markdown
from dinorankclip.report.tables import load_compute, load_results, main_table

# run: (colour top-1, ood top-1, T→I R@1/5/10, I→T R@1/5/10, colour linear probe top-1)
VALUES = {"clip": (0.5, 0.25, (0.25, 0.5, 0.75), (0.125, 0.375, 0.625), 0.875),
          "rankclip": (0.75, 0.375, (0.0625, 0.5, 0.875), (0.5, 0.625, 0.75), 0.8125),
          "clip-kuea": (0.625, 0.25, (0.1875, 0.4375, 0.75), (0.25, 0.375, 0.5), 0.875)}
# run: (nodes, {pair: distance}, (gap, alignment, uniformity image, uniformity text))
GAPS = {"clip": (["text", "z", "teacher"], {("text", "z"): 0.5, ("text", "teacher"): 0.25, ("z", "teacher"): 0.375},
                 (0.5, 1.5, -2.0, -3.0)),
        "rankclip": (["text", "z_g", "z", "teacher"],
                     {("text", "z_g"): 0.625, ("text", "z"): 0.5, ("text", "teacher"): 0.25, ("z_g", "z"): 0.125,
                      ("z_g", "teacher"): 0.5, ("z", "teacher"): 0.4375}, (0.5, 1.25, -2.5, -3.0)),
        "clip-kuea": (["text", "z", "teacher"], {("text", "z"): 0.75, ("text", "teacher"): 0.25, ("z", "teacher"): 0.5},
                      (0.75, 1.75, -1.5, -3.0))}
TUNED = {"clip-kuea": "clip"}
BENCHMARKS = ["demo-colour", "demo-ood", "demo-retrieval"]


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_study(root):
    """results/<study> with evaluate (zero-shot, linear_probe, modality_gap), pretrain and finetune metrics."""
    for run, (colour, ood, t2i, i2t, probe) in VALUES.items():
        ev = root / "evaluate" / run / "seed0"
        write(ev / "demo-colour.json", {"dataset": "wds/demo-colour", "task": "zeroshot_classification",
                                        "classnames": list("abcdef"),
                                        "metrics": {"acc1": colour, "acc5": 1.0, "mean_per_class_recall": colour}})
        write(ev / "demo-ood.json", {"dataset": "wds/demo-ood", "task": "zeroshot_classification",
                                     "classnames": list("abcde"), "metrics": {"acc1": ood, "acc5": 1.0}})
        recalls = {f"{d}_retrieval_recall@{k}": v for d, vals in (("image", t2i), ("text", i2t))
                   for k, v in zip((1, 5, 10), vals, strict=True)}
        write(ev / "demo-retrieval.json", {"dataset": "wds/demo-retrieval", "task": "zeroshot_retrieval",
                                           "metrics": recalls})
        write(ev / "linear_probe" / "demo-colour.json", {"dataset": "wds/demo-colour", "task": "linear_probe",
                                                         "classnames": list("abcdef"),
                                                         "metrics": {"lp_acc1": probe, "weight_decay": 0.01}})
        nodes, pairs, (gap, align, uni_i, uni_t) = GAPS[run]
        dist = [[pairs.get((a, b), pairs.get((b, a), 0.0)) for b in nodes] for a in nodes]
        write(ev / "modality_gap" / "demo-retrieval.json", {
            "dataset": "wds/demo-retrieval", "task": "modality_gap", "nodes": nodes, "centroid_distances": dist,
            "metrics": {"centroid_gap": gap, "alignment": align, "uniformity_image": uni_i, "uniformity_text": uni_t}})
    for run, hours in (("clip", 0.5), ("rankclip", 0.25)):
        write(root / "pretrain" / run / "seed0" / "metrics.json", {"device_hours": hours,
                                                                  "device_hours_unit": "CPU-core-hours"})
    write(root / "finetune" / "clip-kuea" / "seed0" / "metrics.json", {"device_hours": 0.125, "device": "cpu",
                                                             "kernel_loss_first": 0.125, "kernel_loss_last": 0.0625})
    return root


@pytest.fixture
def study(tmp_path):
    return write_study(tmp_path / "results" / "demo")


SEEDS = dict.fromkeys(VALUES, [0])
SPEC = dict(study="demo", runs=list(VALUES), benchmarks=BENCHMARKS, seeds=SEEDS)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Every table and figure of a study with known numbers, built once for the tests that read them."""
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "report"
    out.mkdir()
    study = write_study(tmp / "results" / "demo")
    spec = ReportSpec(**SPEC, sweep_orders={"rankclip": 1, "clip": 0},
                      fusion_variants={"V1 no injection": "clip", "V5 +conflict-aware gate": "rankclip"},
                      aliases={"rankclip": "drc-r3-fusion-v5 = rankclip"}, kuea=TUNED, retrieval=["demo-retrieval"],
                      ood=["demo-ood"], probes=["demo-colour"], gap="demo-retrieval")
    build_report(spec, study, out)
    return out


def md_rows(out, name):
    return (out / f"{name}.md").read_text().splitlines()[4:]  # after "# title", blank, header, rule


def csv(out, name, index="run", text=False):
    """A written CSV with its exact values; `text` keeps empty text cells as "" (not NaN)."""
    return pd.read_csv(out / f"{name}.csv", index_col=index, float_precision="round_trip", keep_default_na=not text)


def test_every_table_and_figure_is_written_in_every_format(report):
    out = report
    tables = ["main", "order_sweep", "fusion_ablation", "ood", "retrieval", "probe", "modality_gap", "kuea"]
    figures = ["main", "order_sweep", "fusion_ablation", "ood", "retrieval", "probe", "modality_gap"]
    assert {p.name for p in out.iterdir()} == ({f"{t}.{s}" for t in tables for s in ("csv", "md", "tex", "html")}
                                               | {f"{f}.{s}" for f in figures for s in ("png", "pdf")})
    for figure in figures:
        assert (out / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{figure}.pdf").read_bytes()[:5] == b"%PDF-"


def test_main_table_cells_bold_marks_and_matched_compute(report):
    out = report
    lines = (out / "main.md").read_text().splitlines()
    assert lines[0] == "# demo: zero-shot results (%; training compute in CPU-core-hours)"
    assert lines[2] == ("| run | demo-colour top-1 | demo-ood top-1 | demo-retrieval T→I R@1 | demo-retrieval I→T R@1 "
                        "| compute (CPU-core-hours) |")
    assert lines[4:] == ["| clip | 50.0 | 25.0 | **25.0** | 12.5 | 0.5 |",
                         "| rankclip | **75.0** | **37.5** | 6.2 | **50.0** | 0.25 |",
                         "| clip-kuea | 62.5 | 25.0 | 18.8 | 25.0 | 0.625 |",  # compute: clip's 0.5 + KUEA's 0.125
                         "| chance | 16.7 | 20.0 | – | – | – |"]
    table = csv(out, "main")
    assert list(table.index) == ["clip", "rankclip", "clip-kuea", "chance"]
    assert table.loc["clip-kuea", "compute (CPU-core-hours)"] == 0.625
    assert table.loc["rankclip", "demo-retrieval T→I R@1"] == 0.0625
    assert table.loc["chance", "demo-colour top-1"] == 1 / 6
    assert (out / "main.tex").read_text().splitlines() == [
        r"\begin{table}[t]", r"\centering",
        r"\caption{demo: zero-shot results (\%; training compute in CPU-core-hours)}",
        r"\begin{tabular}{lrrrrr}", r"\toprule",
        r"run & demo-colour top-1 & demo-ood top-1 & demo-retrieval T$\rightarrow$I R@1 & "
        r"demo-retrieval I$\rightarrow$T R@1 & compute (CPU-core-hours) \\",
        r"\midrule",
        r"clip & 50.0 & 25.0 & \textbf{25.0} & 12.5 & 0.5 \\",
        r"rankclip & \textbf{75.0} & \textbf{37.5} & 6.2 & \textbf{50.0} & 0.25 \\",
        r"clip-kuea & 62.5 & 25.0 & 18.8 & 25.0 & 0.625 \\",
        r"chance & 16.7 & 20.0 & -- & -- & -- \\",
        r"\bottomrule", r"\end{tabular}", r"\end{table}"]


def test_order_sweep_and_fusion_ablation_tables(report):
    out = report
    assert md_rows(out, "order_sweep") == ["| 0 | clip | 50.0 | 25.0 | **25.0** | 12.5 |",
                                           "| 1 | rankclip | **75.0** | **37.5** | 6.2 | **50.0** |"]
    assert list(csv(out, "order_sweep", "R")["run"]) == ["clip", "rankclip"]
    assert md_rows(out, "fusion_ablation") == [
        "| V1 no injection | clip | 50.0 | 25.0 | **25.0** | 12.5 |",
        "| V5 +conflict-aware gate | drc-r3-fusion-v5 = rankclip | **75.0** | **37.5** | 6.2 | **50.0** |",
        "| chance |  | 16.7 | 20.0 | – | – |"]
    tex = (out / "fusion_ablation.tex").read_text().splitlines()
    assert r"\begin{tabular}{llrrrr}" in tex
    assert r"V5 +conflict-aware gate & drc-r3-fusion-v5 = rankclip & \textbf{75.0} & \textbf{37.5} & 6.2 & " \
           r"\textbf{50.0} \\" in tex
    assert csv(out, "fusion_ablation", "variant").loc["V1 no injection", "demo-colour top-1"] == 0.5


def test_ood_retrieval_and_probe_tables(report):
    out = report
    assert md_rows(out, "ood") == ["| clip | 25.0 |", "| rankclip | **37.5** |", "| clip-kuea | 25.0 |",
                                   "| chance | 20.0 |"]
    assert (out / "retrieval.md").read_text().splitlines()[2] == (
        "| run | demo-retrieval T→I R@1 | demo-retrieval T→I R@5 | demo-retrieval T→I R@10 | demo-retrieval I→T R@1 "
        "| demo-retrieval I→T R@5 | demo-retrieval I→T R@10 |")
    assert md_rows(out, "retrieval") == ["| clip | **25.0** | **50.0** | 75.0 | 12.5 | 37.5 | 62.5 |",  # a tie
                                         "| rankclip | 6.2 | **50.0** | **87.5** | **50.0** | **62.5** | **75.0** |",
                                         "| clip-kuea | 18.8 | 43.8 | 75.0 | 25.0 | 37.5 | 50.0 |"]
    assert csv(out, "retrieval").loc["clip-kuea", "demo-retrieval T→I R@5"] == 0.4375
    header = (out / "probe.md").read_text().splitlines()[2]
    assert header == "| run | demo-colour linear probe | demo-colour zero-shot |"
    assert md_rows(out, "probe") == ["| clip | **87.5** | 50.0 |", "| rankclip | 81.2 | **75.0** |",
                                     "| clip-kuea | **87.5** | 62.5 |", "| chance | 16.7 | 16.7 |"]
    assert r"rankclip & 81.2 & \textbf{75.0} \\" in (out / "probe.tex").read_text().splitlines()
    assert csv(out, "probe").loc["rankclip", "demo-colour linear probe"] == 0.8125


def test_modality_gap_table_puts_every_node_pair_in_a_fixed_order(report):
    out = report
    assert (out / "modality_gap.md").read_text().splitlines()[2] == (
        "| run | gap ‖μ_I − μ_T‖ | alignment | uniformity I | uniformity T | d(text, z_g) | d(text, z) "
        "| d(text, teacher) | d(z_g, z) | d(z_g, teacher) | d(z, teacher) |")
    assert md_rows(out, "modality_gap") == [  # no bold: smaller is not simply better here
        "| clip | 0.5 | 1.5 | -2 | -3 | – | 0.5 | 0.25 | – | – | 0.375 |",
        "| rankclip | 0.5 | 1.25 | -2.5 | -3 | 0.625 | 0.5 | 0.25 | 0.125 | 0.5 | 0.4375 |",
        "| clip-kuea | 0.75 | 1.75 | -1.5 | -3 | – | 0.75 | 0.25 | – | – | 0.5 |"]
    table = csv(out, "modality_gap")
    assert table.loc["rankclip", "d(z_g, z)"] == 0.125 and math.isnan(table.loc["clip", "d(z_g, z)"])
    assert r"\caption{demo: modality gap on demo-retrieval (L2-normalised embeddings)}" in \
        (out / "modality_gap.tex").read_text()


def test_kuea_table_holds_before_after_and_the_difference(report):
    out = report
    assert md_rows(out, "kuea") == ["| clip-kuea before | clip | 0.125 | 50.0 | 25.0 | 25.0 | 12.5 |",
                                    "| clip-kuea after | clip-kuea | 0.0625 | 62.5 | 25.0 | 18.8 | 25.0 |",
                                    "| clip-kuea Δ |  | -0.0625 | +12.5 | +0.0 | -6.2 | +12.5 |"]
    assert r"clip-kuea $\Delta$ &  & -0.0625 & +12.5 & +0.0 & -6.2 & +12.5 \\" in \
        (out / "kuea.tex").read_text().splitlines()
    table = csv(out, "kuea", "KUEA", text=True)
    assert table.loc["clip-kuea Δ", "demo-retrieval I→T R@1"] == 0.125
    assert table.loc["clip-kuea after", "run"] == "clip-kuea"


def test_tables_of_absent_runs_or_suites_are_skipped(study, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    build_report(ReportSpec(study="demo", runs=["clip", "rankclip"], benchmarks=["demo-colour"], seeds=SEEDS), study,
                 out)
    assert {p.stem for p in out.iterdir()} == {"main"}
    assert "<td><b>75.0</b></td><td>0.25</td>" in (out / "main.html").read_text()
    assert md_rows(out, "main") == ["| clip | 50.0 | 0.5 |", "| rankclip | **75.0** | 0.25 |", "| chance | 16.7 | – |"]


def test_missing_files_are_named(study, tmp_path):
    with pytest.raises(FileNotFoundError, match="rankclip/seed0/demo-shape.json"):
        load_results(study / "evaluate", ["rankclip"], ["demo-shape"], SEEDS)
    (study / "finetune" / "clip-kuea" / "seed0" / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="finetune/clip-kuea/seed0/metrics.json"):
        load_compute(study, ["clip", "clip-kuea"], TUNED, SEEDS)


def test_compute_units_are_named_and_mixed_units_say_so(study):
    assert load_compute(study, ["clip", "rankclip"], {}, SEEDS) == ({"clip": 0.5, "rankclip": 0.25}, "CPU-core-hours")
    write(study / "pretrain" / "rankclip" / "seed0" / "metrics.json", {"device_hours": 2.0,
                                                                       "device_hours_unit": "GPU-hours"})
    assert load_compute(study, ["clip", "rankclip"], {}, SEEDS)[1] == "CPU-core-hours + GPU-hours"


def test_bold_never_marks_plain_columns_chance_or_a_single_row():
    table = pd.DataFrame({"a": [0.5, 0.25, 0.9], "hours": [1.0, 2.0, math.nan]},
                         index=pd.Index(["x", "y", "chance"], name="run"))
    assert to_markdown(table, Style(plain=("hours",))).splitlines()[2:] == [
        "| x | **50.0** | 1 |", "| y | 25.0 | 2 |", "| chance | 90.0 | – |"]
    single = to_markdown(table.iloc[[0]], Style(plain=("hours",)))
    assert single.splitlines()[2] == "| x | 50.0 | 1 |"  # nothing to compare against
    assert r"x\_1 & \textbf{50.0} & 1 \\" in to_latex(table.rename(index={"x": "x_1"}), "t", Style(plain=("hours",)))


def test_main_table_without_compute_keeps_the_json_values(study):
    table = main_table(load_results(study / "evaluate", ["rankclip", "clip"], ["demo-colour"], SEEDS))
    assert list(table.index) == ["rankclip", "clip", "chance"]
    assert table["demo-colour top-1"].tolist()[:2] == [0.75, 0.5]


def test_classical_mds_reproduces_the_distances_of_three_points():
    points = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    xy = classical_mds(dist)
    assert np.allclose(np.linalg.norm(xy[:, None] - xy[None], axis=-1), dist)
