"""Report tables from evaluation JSONs of known (run, seed)s: every table's cells (means ± 95% intervals over seeds),
ordering and marks, exactly, in CSV, markdown and LaTeX; the declared comparisons' tests against scipy, Holm within
each column; McNemar for a one-seed run; the compute column; figures written as PNG and PDF."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from dinorankclip.io import write_json
from dinorankclip.report.build import ReportSpec, build_report
from dinorankclip.report.figures import classical_mds, run_styles
from dinorankclip.report.render import Style, to_latex, to_markdown
from dinorankclip.report.tables import Table, load_results, load_train_flops, main_table

SEEDS = {"clip": [0, 1, 2], "rankclip": [0, 1, 2], "cyclip": [0], "clip-kuea": [0, 1, 2]}
# (run, seed): (colour top-1, ood top-1, T→I R@1/5/10, I→T R@1/5/10, colour linear probe top-1)
# rankclip − clip on colour: +0.25, +0.265625, +0.234375 (significant); on ood: +0.125, −0.125, +0.03125 (not)
VALUES = {
    ("clip", 0): (0.5, 0.25, (0.25, 0.5, 0.75), (0.125, 0.375, 0.625), 0.875),
    ("clip", 1): (0.5625, 0.375, (0.25, 0.5, 0.75), (0.125, 0.375, 0.625), 0.875),
    ("clip", 2): (0.53125, 0.3125, (0.25, 0.5, 0.75), (0.125, 0.375, 0.625), 0.875),
    ("rankclip", 0): (0.75, 0.375, (0.0625, 0.5, 0.875), (0.5, 0.625, 0.75), 0.8125),
    ("rankclip", 1): (0.828125, 0.25, (0.0625, 0.5, 0.875), (0.5, 0.625, 0.75), 0.8125),
    ("rankclip", 2): (0.765625, 0.34375, (0.0625, 0.5, 0.875), (0.5, 0.625, 0.75), 0.8125),
    ("cyclip", 0): (0.6875, 0.28125, (0.125, 0.25, 0.5), (0.125, 0.25, 0.5), 0.75),
    ("clip-kuea", 0): (0.515625, 0.25, (0.1875, 0.4375, 0.75), (0.25, 0.375, 0.5), 0.875),
    ("clip-kuea", 1): (0.5625, 0.375, (0.1875, 0.4375, 0.75), (0.25, 0.375, 0.5), 0.875),
    ("clip-kuea", 2): (0.546875, 0.3125, (0.1875, 0.4375, 0.75), (0.25, 0.375, 0.5), 0.875),
}
N_COLOUR, N_OOD = 64, 32
COMPARISONS = [("rankclip", "clip"), ("cyclip", "clip"), ("clip-kuea", "clip")]
TUNED = {"clip-kuea": "clip"}
BENCHMARKS = ["demo-colour", "demo-ood", "demo-retrieval"]
GAP = (["text", "z", "teacher"], {("text", "z"): 0.5, ("text", "teacher"): 0.25, ("z", "teacher"): 0.375})


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def bits(correct: int, n: int, first: int = 0) -> str:
    """n items of which `correct` are right, starting at item `first` (wrapping)."""
    out = ["0"] * n
    for i in range(correct):
        out[(first + i) % n] = "1"
    return "".join(out)


def items_of(run: str, seed: int, colour: float, ood: float) -> tuple[str, str]:
    """Per-item correctness: cyclip is right on 12 colour items where clip (seed 0) is wrong and wrong on none where
    clip is right; on ood the two disagree on a few items either way."""
    if run == "cyclip":
        return bits(44, N_COLOUR), bits(9, N_OOD, first=3)
    return bits(round(colour * N_COLOUR), N_COLOUR), bits(round(ood * N_OOD), N_OOD)


def write_study(root):
    """results/<study> with every (run, seed)'s evaluate outputs (zero-shot, items, linear_probe, modality_gap),
    pretrain and finetune metrics."""
    for (run, seed), (colour, ood, t2i, i2t, probe) in VALUES.items():
        ev = root / "evaluate" / run / f"seed{seed}"
        write(ev / "demo-colour.json", {"dataset": "wds/demo-colour", "task": "zeroshot_classification",
                                        "classnames": list("abcdef"),
                                        "metrics": {"acc1": colour, "acc5": 1.0, "mean_per_class_recall": colour}})
        write(ev / "demo-ood.json", {"dataset": "wds/demo-ood", "task": "zeroshot_classification",
                                     "classnames": list("abcde"), "metrics": {"acc1": ood, "acc5": 1.0}})
        recalls = {f"{d}_retrieval_recall@{k}": v * (1 - seed / 16) for d, vals in (("image", t2i), ("text", i2t))
                   for k, v in zip((1, 5, 10), vals, strict=True)}
        write(ev / "demo-retrieval.json", {"dataset": "wds/demo-retrieval", "task": "zeroshot_retrieval",
                                           "metrics": recalls})
        colour_bits, ood_bits = items_of(run, seed, colour, ood)
        write(ev / "items" / "demo-colour.json", {"n": N_COLOUR, "correct_top1": colour_bits})
        write(ev / "items" / "demo-ood.json", {"n": N_OOD, "correct_top1": ood_bits})
        write(ev / "items" / "demo-retrieval.json", {"n": 16})
        write(ev / "linear_probe" / "demo-colour.json", {"dataset": "wds/demo-colour", "task": "linear_probe",
                                                         "classnames": list("abcdef"),
                                                         "metrics": {"lp_acc1": probe, "weight_decay": 0.01}})
        nodes, pairs = GAP
        dist = [[pairs.get((a, b), pairs.get((b, a), 0.0)) + 0.0625 * seed * (a != b) for b in nodes] for a in nodes]
        write(ev / "modality_gap" / "demo-retrieval.json", {
            "dataset": "wds/demo-retrieval", "task": "modality_gap", "nodes": nodes, "centroid_distances": dist,
            "metrics": {"centroid_gap": 0.5 + 0.125 * seed, "alignment": 1.5, "uniformity_image": -2.0,
                        "uniformity_text": -3.0}})
        if run in TUNED:
            write(root / "finetune" / run / f"seed{seed}" / "metrics.json", {
                "train_flops": 1e14, "kernel_loss_first": 0.125, "kernel_loss_last": 0.0625 + 0.0078125 * seed})
        else:
            strength = {"transition/gamma_2": 0.03 * (seed + 1), "transition/strength_2": 0.1} if run == "rankclip" \
                else {}
            write(root / "pretrain" / run / f"seed{seed}" / "metrics.json", {
                "train_flops": 2e15 if run == "clip" else 3e15, "strength": strength})
    return root


@pytest.fixture
def study(tmp_path):
    return write_study(tmp_path / "results" / "demo")


SPEC = dict(study="demo", runs=list(SEEDS), benchmarks=BENCHMARKS, seeds=SEEDS, comparisons=COMPARISONS)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Every table and figure of a study with known numbers, built once for the tests that read them."""
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "report"
    out.mkdir()
    study = write_study(tmp / "results" / "demo")
    spec = ReportSpec(**SPEC, sweep_orders={"clip": 0, "rankclip": 2},
                      fusion_variants={"V1 no injection": "clip", "V5 +conflict-aware gate": "rankclip"},
                      aliases={"rankclip": "drc-r3-fusion-v5 = rankclip"}, kuea=TUNED, retrieval=["demo-retrieval"],
                      ood=["demo-ood"], probes=["demo-colour"], gap="demo-retrieval")
    build_report(spec, study, out)
    return out


def md_rows(out, name):
    lines = (out / f"{name}.md").read_text().splitlines()
    return lines[lines.index(next(line for line in lines if line.startswith("|---"))) + 1:]


def csv(out, name, index="run", text=False):
    """A written CSV with its exact values; `text` keeps empty text cells as "" (not NaN)."""
    return pd.read_csv(out / f"{name}.csv", index_col=index, float_precision="round_trip", keep_default_na=not text)


def half(values) -> float:
    return scipy_stats.t.ppf(0.975, len(values) - 1) * scipy_stats.sem(values)


def colour(run):
    return [VALUES[(run, s)][0] for s in SEEDS[run]]


def test_every_table_and_figure_is_written_in_every_format(report):
    tables = ["main", "comparisons", "comparisons_p", "order_sweep", "fusion_ablation", "ood", "retrieval", "probe",
              "modality_gap", "kuea"]
    figures = ["main", "order_sweep", "fusion_ablation", "ood", "retrieval", "probe", "modality_gap"]
    assert {p.name for p in report.iterdir()} == ({f"{t}.{s}" for t in tables for s in ("csv", "md", "tex", "html")}
                                                  | {f"{f}.{s}" for f in figures for s in ("png", "pdf")})
    for figure in figures:
        assert (report / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (report / f"{figure}.pdf").read_bytes()[:5] == b"%PDF-"


def test_main_table_prints_means_intervals_seeds_and_exactly_the_significant_cells(report):
    lines = (report / "main.md").read_text().splitlines()
    assert lines[0] == "# demo: zero-shot results (%)"
    assert "3 seeds: clip, rankclip, clip-kuea; 1 seed: cyclip" in lines[2]
    assert "demo-colour n = 64, demo-ood n = 32, demo-retrieval n = 16" in lines[2]
    assert lines[4] == ("| run | demo-colour top-1 | demo-ood top-1 | demo-retrieval T→I R@1 | demo-retrieval I→T R@1 "
                        "| train PFLOP | seeds |")
    c, r, k = (f"{100 * np.mean(colour(run)):.1f} ± {100 * half(colour(run)):.1f}" for run in ("clip", "rankclip",
                                                                                            "clip-kuea"))
    # rankclip − clip on colour: paired t over 3 seeds; cyclip − clip: McNemar on seed 0 (12 discordant items, all
    # for cyclip); both survive Holm over the three comparisons of the column, clip-kuea's does not
    assert md_rows(report, "main") == [
        f"| clip | {c} | 31.2 ± 15.5 | 23.4 ± 3.9 | 11.7 ± 1.9 | 2 ± 0 | 3 |",
        f"| rankclip | **{r}*** | 32.3 ± 16.2 | 5.9 ± 1.0* | **46.9 ± 7.8*** | 3 ± 0 | 3 |",
        "| cyclip | **68.8*** | 28.1 | 12.5 | 12.5 | 3 | 1 |",
        f"| clip-kuea | {k} | 31.2 ± 15.5 | 17.6 ± 2.9* | **23.4 ± 3.9*** | 2.1 ± 0 | 3 |",
        "| chance | 16.7 | 20.0 | – | – | – |  |"]
    table = csv(report, "main")
    assert table.loc["rankclip", "demo-colour top-1"] == pytest.approx(np.mean(colour("rankclip")), rel=1e-15)
    assert table.loc["rankclip", "demo-colour top-1 ±95%"] == pytest.approx(half(colour("rankclip")), rel=1e-12)
    assert math.isnan(table.loc["cyclip", "demo-colour top-1 ±95%"])
    assert table.loc["clip-kuea", "train PFLOP"] == 2.1 and table.loc["cyclip", "seeds"] == 1
    assert table.loc["chance", "demo-colour top-1"] == 1 / 6
    tex = (report / "main.tex").read_text()
    assert r"rankclip & \textbf{" in tex and r"$\pm$" in tex and r"T$\rightarrow$I" in tex


def test_comparisons_equal_scipy_with_holm_within_each_column(report):
    diff = [a - b for a, b in zip(colour("rankclip"), colour("clip"), strict=True)]
    t_p = scipy_stats.ttest_rel(colour("rankclip"), colour("clip")).pvalue
    kuea_p = scipy_stats.ttest_rel(colour("clip-kuea"), colour("clip")).pvalue
    mcnemar_p = scipy_stats.binomtest(12, 12, 0.5).pvalue
    ranked = sorted([t_p, mcnemar_p, kuea_p])
    holm = {p: max(min(1, (3 - i) * q) for i, q in enumerate(ranked[: ranked.index(p) + 1]))
            for p in (t_p, mcnemar_p, kuea_p)}
    table = csv(report, "comparisons_p", "comparison", text=True)
    assert table.loc["rankclip − clip", "demo-colour top-1"] == pytest.approx(holm[t_p], rel=1e-9)
    assert table.loc["cyclip − clip", "demo-colour top-1"] == pytest.approx(holm[mcnemar_p], rel=1e-9)
    assert table.loc["clip-kuea − clip", "demo-colour top-1"] == pytest.approx(holm[kuea_p], rel=1e-9)
    assert holm[t_p] < 0.05 and holm[mcnemar_p] < 0.05 and holm[kuea_p] > 0.05
    assert table.loc["cyclip − clip", "test"].startswith("McNemar (1 seed") and \
        table.loc["rankclip − clip", "test"] == "paired t"
    assert table.loc["cyclip − clip", "demo-retrieval T→I R@1"] == ""  # no retrieval test on one seed (text=True)
    assert float(table.loc["clip-kuea − clip", "demo-ood top-1"]) == 1  # identical (zero) differences
    differences = csv(report, "comparisons", "comparison")
    assert differences.loc["rankclip − clip", "demo-colour top-1"] == pytest.approx(np.mean(diff), rel=1e-12)
    assert differences.loc["rankclip − clip", "demo-colour top-1 ±95%"] == pytest.approx(half(diff), rel=1e-12)
    rows = md_rows(report, "comparisons")
    assert rows[0].startswith("| rankclip − clip | 3 | **+25.0 ± 3.9*** |")
    assert rows[1].startswith("| cyclip − clip | 1 | **+18.8*** |")


def test_order_sweep_and_fusion_tables_carry_the_strength_columns_and_marks(report):
    sweep = csv(report, "order_sweep", "R")
    assert list(sweep.index) == [0, 2] and list(sweep["run"]) == ["clip", "rankclip"]
    assert sweep.loc[2, "γ_2"] == pytest.approx(0.06) and math.isnan(sweep.loc[0, "γ_2"])
    assert sweep.loc[2, "γ_2 ±95%"] == pytest.approx(half([0.03, 0.06, 0.09]))
    assert sweep.loc[2, "acted (γ beyond ±0.02)"] == 1 and sweep.loc[0, "acted (γ beyond ±0.02)"] == 0
    rows = md_rows(report, "order_sweep")
    assert "***" in rows[1] and "***" not in rows[0]  # rankclip's colour cell, significant against clip
    fusion = md_rows(report, "fusion_ablation")
    assert fusion[0].startswith("| V1 no injection | clip |") and fusion[-1].startswith("| chance |  | 16.7 |")
    assert fusion[1].startswith("| V5 +conflict-aware gate | drc-r3-fusion-v5 = rankclip | **")


def test_kuea_table_pairs_after_with_before_by_seed(report):
    table = csv(report, "kuea", "KUEA", text=True)
    deltas = [a - b for a, b in zip(colour("clip-kuea"), colour("clip"), strict=True)]
    assert table.loc["clip-kuea Δ", "demo-colour top-1"] == pytest.approx(np.mean(deltas), rel=1e-12)
    assert table.loc["clip-kuea Δ", "demo-colour top-1 ±95%"] == pytest.approx(half(deltas), rel=1e-12)
    assert table.loc["clip-kuea after", "kernel loss"] == pytest.approx(0.0703125)
    assert table.loc["clip-kuea before", "run"] == "clip" and table.loc["clip-kuea after", "run"] == "clip-kuea"
    rows = md_rows(report, "kuea")
    assert rows[2] == ("| clip-kuea Δ |  | -0.05469 ± 0.019 | +1.0 ± 2.2 | +0.0 ± 0.0 | -5.9 ± 1.0* "
                       "| **+11.7 ± 1.9*** | 3 |")


def test_ood_retrieval_probe_and_gap_tables(report):
    assert md_rows(report, "ood")[-1] == "| chance | 20.0 |  |"
    retrieval = csv(report, "retrieval")
    assert retrieval.loc["clip-kuea", "demo-retrieval T→I R@5"] == 0.4375 * (1 - 1 / 16)  # seeds 0, 1, 2: mean scale
    assert list(retrieval.columns[:6]) == [f"demo-retrieval {d} R@{k}" for d in ("T→I", "I→T") for k in (1, 5, 10)]
    assert csv(report, "probe").loc["rankclip", "demo-colour linear probe"] == 0.8125
    gap = csv(report, "modality_gap")
    assert gap.loc["clip", "gap ‖μ_I − μ_T‖"] == pytest.approx(0.625)  # mean of 0.5, 0.625, 0.75
    assert "d(z_g, z)" not in gap.columns  # no run has a z_g node
    assert "**" not in (report / "modality_gap.md").read_text()


def test_tables_of_absent_runs_or_suites_are_skipped(study, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    build_report(ReportSpec(study="demo", runs=["clip", "rankclip"], benchmarks=["demo-colour"], seeds=SEEDS),
                 study, out)
    assert {p.stem for p in out.iterdir()} == {"main"}
    assert "**" not in (out / "main.md").read_text()  # no declared comparison: nothing is bold


def test_missing_files_are_named(study):
    with pytest.raises(FileNotFoundError, match="rankclip/seed0/demo-shape.json"):
        load_results(study / "evaluate", ["rankclip"], ["demo-shape"], SEEDS)
    (study / "finetune" / "clip-kuea" / "seed1" / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="finetune/clip-kuea/seed1/metrics.json"):
        load_train_flops(study, ["clip", "clip-kuea"], TUNED, SEEDS)


def test_bold_marks_only_the_given_cells_never_the_largest_number():
    values = pd.DataFrame({"a": [0.5, 0.25, 0.9], "hours": [1.0, 2.0, math.nan]},
                          index=pd.Index(["x", "y", "chance"], name="run"))
    table = Table(values, pd.DataFrame({"a": [0.125, math.nan]}, index=["x", "y"]))
    assert to_markdown(table, Style(plain=("hours",))).splitlines()[2:] == [
        "| x | 50.0 ± 12.5 | 1 |", "| y | 25.0 | 2 |", "| chance | 90.0 | – |"]
    table.significant, table.better = {("y", "a")}, {("y", "a")}
    assert to_markdown(table, Style(plain=("hours",))).splitlines()[3] == "| y | **25.0*** | 2 |"
    assert r"x\_1 & 50.0 $\pm$ 12.5 & 1 \\" in to_latex(
        Table(values.rename(index={"x": "x_1"}), table.intervals.rename(index={"x": "x_1"})), "t",
        Style(plain=("hours",)))


def test_main_table_without_compute_keeps_the_seed_means(study):
    table = main_table(load_results(study / "evaluate", ["rankclip", "clip"], ["demo-colour"], SEEDS))
    assert list(table.values.index) == ["rankclip", "clip", "chance"]
    assert table.values["demo-colour top-1"].tolist()[:2] == pytest.approx([np.mean(colour("rankclip")),
                                                                            np.mean(colour("clip"))])


def test_every_run_gets_its_own_colour_and_marker():
    styles = run_styles([f"run{i}" for i in range(20)])
    assert len(set(styles.values())) == 20 and len({c for c, _ in styles.values()}) == 20


def test_classical_mds_reproduces_the_distances_of_three_points():
    points = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    xy = classical_mds(dist)
    assert np.allclose(np.linalg.norm(xy[:, None] - xy[None], axis=-1), dist)


def test_reference_record_compares_a_study_cell_by_cell(study, tmp_path):
    from dinorankclip.report.reference import Z95, compare, read_record, write_record

    spec = ReportSpec(**SPEC)
    record = write_record(spec, study, tmp_path / "demo.json")
    assert read_record(tmp_path / "demo.json") == record and record["machine"]["cores"] >= 1
    assert record["metrics"]["demo-colour top-1"]["rankclip"] == {"0": 0.75, "1": 0.828125, "2": 0.765625}
    same = compare(record, spec, study)
    assert len(same) == 4 * 4 and not same["outside"].any()  # 4 runs × 4 headline metrics
    # another machine: rankclip's colour mean leaves its 3-seed interval, cyclip's ood stays inside its binomial one
    for seed, value in zip(SEEDS["rankclip"], (0.5, 0.5, 0.5), strict=True):
        path = study / "evaluate" / "rankclip" / f"seed{seed}" / "demo-colour.json"
        result = json.loads(path.read_text())
        result["metrics"]["acc1"] = value
        path.write_text(json.dumps(result))
    path = study / "evaluate" / "cyclip" / "seed0" / "demo-ood.json"
    result = json.loads(path.read_text())
    result["metrics"]["acc1"] += 0.9 * Z95 * math.sqrt(0.28125 * 0.71875 / N_OOD)
    path.write_text(json.dumps(result))
    moved = compare(record, spec, study).set_index(["run", "metric"])
    assert moved["outside"].sum() == 1 and moved.loc[("rankclip", "demo-colour top-1"), "outside"]
    assert moved.loc[("cyclip", "demo-ood top-1"), "±95%"] == pytest.approx(Z95 * math.sqrt(0.28125 * 0.71875 / 32))
    with pytest.raises(FileNotFoundError, match="reference write"):
        read_record(tmp_path / "none.json")


def test_measured_cost_sums_a_fine_tuned_runs_jobs_and_names_the_seeds_without_timings(tmp_path):
    from dinorankclip.report.measured import write_measured_cost

    timings = tmp_path / "timings"
    jobs = {("pretrain", "clip", 0): (0.5, 100.0), ("pretrain", "clip", 1): (0.7, 140.0),
            ("finetune", "clip-kuea", 0): (0.1, 20.0), ("finetune", "clip-kuea", 1): (0.1, 30.0),
            ("pretrain", "drc-r3", 0): (0.9, 180.0)}
    for (stage, run, seed), (hours, seconds) in jobs.items():
        write_json(timings / stage / run / f"seed{seed}.json", {"stage": stage, "run": run, "seed": seed,
                   "device_hours": hours, "device_hours_unit": "CPU-core-hours", "train_seconds": seconds})
    paths = write_measured_cost("demo", timings, ["clip", "drc-r3", "clip-kuea"], {"clip-kuea": "clip"},
                                {"clip": [0, 1], "drc-r3": [0, 1], "clip-kuea": [0, 1]})
    assert [p.name for p in paths] == ["compute.csv", "compute.md", "compute.tex", "compute.html"]
    table = pd.read_csv(timings / "compute.csv", index_col="run")
    assert table.loc["clip", "device-hours"] == pytest.approx(0.6)
    assert table.loc["clip", "device-hours ±95%"] == pytest.approx(12.7062047 * 0.1, rel=1e-6)  # t(1) × s/√2
    assert table.loc["clip-kuea", "device-hours"] == pytest.approx(0.7)  # its start run's 0.6 plus its own 0.1
    assert table.loc["clip-kuea", "train seconds"] == pytest.approx((120 + 170) / 2)
    assert table.loc["drc-r3", "seeds"] == 1 and table.loc["drc-r3", "device-hours"] == pytest.approx(0.9)
    markdown = (timings / "compute.md").read_text()
    assert "Without timings (left out): drc-r3/seed1." in markdown
    assert "| clip | 0.6 ± 1.3 | 120 ± 2.5e+02 | 2 |" in markdown, markdown  # hours and seconds, not percentages
    assert write_measured_cost("demo", tmp_path / "none", ["clip"], {}, {"clip": [0]}) == []
