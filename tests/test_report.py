"""Report tables: exact cells, ordering, chance row and bold marks from evaluation JSONs with known numbers."""

import json
import math

import pandas as pd
import pytest

from dinorankclip.report.build import build_report
from dinorankclip.report.tables import (
    fusion_ablation_table,
    kuea_table,
    load_results,
    main_table,
    order_sweep_table,
    to_markdown,
)


def write_results(root, values):
    for run, (colour, r_t2i, r_i2t) in values.items():
        (root / run).mkdir(parents=True)
        (root / run / "demo-colour.json").write_text(json.dumps({
            "dataset": "wds/demo-colour", "task": "zeroshot_classification", "classnames": list("abcdef"),
            "metrics": {"acc1": colour, "acc5": 1.0, "mean_per_class_recall": colour}}))
        (root / run / "demo-retrieval.json").write_text(json.dumps({
            "dataset": "wds/demo-retrieval", "task": "zeroshot_retrieval",
            "metrics": {"image_retrieval_recall@1": r_t2i, "text_retrieval_recall@1": r_i2t,
                        "image_retrieval_recall@5": 0.9, "text_retrieval_recall@5": 0.9}}))


@pytest.fixture
def evaluated(tmp_path):
    write_results(tmp_path, {"clip": (0.5, 0.25, 0.125), "rankclip": (0.75, 0.0625, 0.5)})
    return tmp_path


def test_main_table_holds_the_json_values_exactly(evaluated):
    table = main_table(load_results(evaluated, ["rankclip", "clip"], ["demo-colour", "demo-retrieval"]))
    assert list(table.index) == ["rankclip", "clip", "chance"]  # run order as given, chance last
    assert list(table.columns) == ["demo-colour top-1", "demo-retrieval T→I R@1", "demo-retrieval I→T R@1"]
    assert table.loc["clip"].tolist() == [0.5, 0.25, 0.125]
    assert table.loc["rankclip"].tolist() == [0.75, 0.0625, 0.5]
    assert table.loc["chance", "demo-colour top-1"] == 1 / 6
    assert math.isnan(table.loc["chance", "demo-retrieval I→T R@1"])


def test_markdown_marks_the_best_run_per_column(evaluated):
    table = main_table(load_results(evaluated, ["clip", "rankclip"], ["demo-colour", "demo-retrieval"]))
    lines = to_markdown(table).splitlines()
    assert lines[2] == "| clip | 50.0 | **25.0** | 12.5 |"
    assert lines[3] == "| rankclip | **75.0** | 6.2 | **50.0** |"
    assert lines[4] == "| chance | 16.7 | – | – |"


def test_report_stage_writes_csv_markdown_and_figures(evaluated, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    build_report("demo", evaluated, ["clip", "rankclip"], ["demo-colour", "demo-retrieval"], {}, out)
    assert {p.name for p in out.iterdir()} == {"main.csv", "main.md", "main.png", "main.pdf"}
    csv = pd.read_csv(out / "main.csv", index_col="run", float_precision="round_trip")
    assert csv.loc["rankclip", "demo-retrieval T→I R@1"] == 0.0625 and csv.loc["clip", "demo-colour top-1"] == 0.5


def test_missing_result_names_the_file(evaluated):
    with pytest.raises(FileNotFoundError, match="rankclip/demo-shape.json"):
        load_results(evaluated, ["rankclip"], ["demo-shape"])


def test_order_sweep_table_is_indexed_by_order_and_holds_the_json_values(evaluated, tmp_path):
    results = load_results(evaluated, ["clip", "rankclip"], ["demo-colour", "demo-retrieval"])
    sweep = order_sweep_table(results, {"rankclip": 1, "clip": 0})
    assert list(sweep.index) == [0, 1] and list(sweep["run"]) == ["clip", "rankclip"]
    assert sweep.loc[1, "demo-colour top-1"] == 0.75 and sweep.loc[0, "demo-retrieval I→T R@1"] == 0.125
    assert to_markdown(sweep).splitlines()[2:] == ["| 0 | clip | 50.0 | **25.0** | 12.5 |",
                                                   "| 1 | rankclip | **75.0** | 6.2 | **50.0** |"]
    out = tmp_path / "report"
    out.mkdir()
    build_report("demo", evaluated, ["clip", "rankclip"], ["demo-colour", "demo-retrieval"],
                 {"clip": 0, "rankclip": 1}, out)
    names = {p.name for p in out.iterdir()}
    assert {"order_sweep.csv", "order_sweep.md", "order_sweep.png", "order_sweep.pdf"} <= names
    assert pd.read_csv(out / "order_sweep.csv", index_col="R", float_precision="round_trip").loc[1, "run"] == "rankclip"


def test_fusion_ablation_table_is_indexed_by_variant_and_names_aliases(evaluated, tmp_path):
    results = load_results(evaluated, ["clip", "rankclip"], ["demo-colour", "demo-retrieval"])
    variants = {"V1 no injection": "clip", "V5 +conflict-aware gate": "rankclip"}
    table = fusion_ablation_table(results, variants, {"rankclip": "drc-r3-fusion-v5 = rankclip"})
    assert list(table.index) == ["V1 no injection", "V5 +conflict-aware gate", "chance"]
    assert list(table["run"]) == ["clip", "drc-r3-fusion-v5 = rankclip", ""]
    assert table.loc["V5 +conflict-aware gate", "demo-retrieval I→T R@1"] == 0.5
    assert to_markdown(table).splitlines()[2:] == ["| V1 no injection | clip | 50.0 | **25.0** | 12.5 |",
                                                   "| V5 +conflict-aware gate | drc-r3-fusion-v5 = rankclip | **75.0** "
                                                   "| 6.2 | **50.0** |",
                                                   "| chance |  | 16.7 | – | – |"]
    out = tmp_path / "report"
    out.mkdir()
    build_report("demo", evaluated, ["clip", "rankclip"], ["demo-colour", "demo-retrieval"], {}, out, variants)
    assert {"fusion_ablation.csv", "fusion_ablation.md", "fusion_ablation.png"} <= {p.name for p in out.iterdir()}
    csv = pd.read_csv(out / "fusion_ablation.csv", index_col="variant", float_precision="round_trip")
    assert csv.loc["V1 no injection", "demo-colour top-1"] == 0.5


def write_finetune_metrics(root, losses):
    for run, (first, last) in losses.items():
        (root / run).mkdir(parents=True)
        (root / run / "metrics.json").write_text(json.dumps({"kernel_loss_first": first, "kernel_loss_last": last}))


def test_kuea_table_holds_before_after_and_the_difference_exactly(evaluated, tmp_path):
    write_results(evaluated, {"clip-kuea": (0.625, 0.1875, 0.25), "rankclip-kuea": (0.75, 0.125, 0.5)})
    runs = ["clip", "rankclip", "clip-kuea", "rankclip-kuea"]
    results = load_results(evaluated, runs, ["demo-colour", "demo-retrieval"])
    tuned = {"clip-kuea": "clip", "rankclip-kuea": "rankclip"}
    table = kuea_table(results, tuned, {"clip-kuea": (0.125, 0.0625), "rankclip-kuea": (0.5, 0.5)})
    assert list(table.index) == ["clip-kuea before", "clip-kuea after", "clip-kuea Δ",
                                 "rankclip-kuea before", "rankclip-kuea after", "rankclip-kuea Δ"]
    assert list(table.columns) == ["run", "kernel loss", "demo-colour top-1", "demo-retrieval T→I R@1",
                                   "demo-retrieval I→T R@1"]
    assert table.loc["clip-kuea before"].tolist() == ["clip", 0.125, 0.5, 0.25, 0.125]
    assert table.loc["clip-kuea after"].tolist() == ["clip-kuea", 0.0625, 0.625, 0.1875, 0.25]
    assert table.loc["clip-kuea Δ"].tolist() == ["", -0.0625, 0.125, -0.0625, 0.125]
    assert table.loc["rankclip-kuea Δ"].tolist() == ["", 0.0, 0.0, 0.0625, 0.0]
    signed = ("clip-kuea Δ", "rankclip-kuea Δ")
    lines = to_markdown(table, bold=False, plain=("kernel loss",), signed_rows=signed).splitlines()
    assert lines[2:5] == ["| clip-kuea before | clip | 0.125 | 50.0 | 25.0 | 12.5 |",
                          "| clip-kuea after | clip-kuea | 0.0625 | 62.5 | 18.8 | 25.0 |",
                          "| clip-kuea Δ |  | -0.0625 | +12.5 | -6.2 | +12.5 |"]
    assert lines[7] == "| rankclip-kuea Δ |  | +0 | +0.0 | +6.2 | +0.0 |"

    out, finetune = tmp_path / "report", tmp_path / "finetune"
    out.mkdir()
    write_finetune_metrics(finetune, {"clip-kuea": (0.125, 0.0625), "rankclip-kuea": (0.5, 0.5)})
    build_report("demo", evaluated, runs, ["demo-colour", "demo-retrieval"], {}, out, kuea=tuned,
                 finetune_dir=finetune)
    names = {p.name for p in out.iterdir()}
    assert {"kuea.csv", "kuea.md"} <= names and "kuea.png" not in names
    csv = pd.read_csv(out / "kuea.csv", index_col="KUEA", float_precision="round_trip", keep_default_na=False)
    assert csv.loc["clip-kuea Δ", "demo-retrieval I→T R@1"] == 0.125
    assert csv.loc["clip-kuea after", "run"] == "clip-kuea"
    assert csv.loc["clip-kuea before", "kernel loss"] == 0.125
    assert (out / "kuea.md").read_text().splitlines()[4] == "| clip-kuea before | clip | 0.125 | 50.0 | 25.0 | 12.5 |"
    main = pd.read_csv(out / "main.csv", index_col="run", float_precision="round_trip")
    assert main.loc["clip-kuea", "demo-colour top-1"] == 0.625  # fine-tuned runs are rows of the main table too


def test_kuea_table_names_a_missing_metrics_file(evaluated, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    write_results(evaluated, {"clip-kuea": (0.625, 0.1875, 0.25)})
    with pytest.raises(FileNotFoundError, match="finetune/clip-kuea/metrics.json"):
        build_report("demo", evaluated, ["clip", "clip-kuea"], ["demo-colour"], {}, out, kuea={"clip-kuea": "clip"},
                     finetune_dir=tmp_path / "finetune")


def test_no_finetuned_runs_no_kuea_table(evaluated, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    build_report("demo", evaluated, ["clip"], ["demo-colour"], {}, out, kuea={}, finetune_dir=tmp_path / "missing")
    assert not any(p.name.startswith("kuea") for p in out.iterdir())
