"""`make demo` on a fresh clone, end to end with the real tools, and every promise the README makes about it.

Runs in file order: the first test builds the demo (`make demo`: its jobs are forks of the fork server), the last one
rebuilds two runs of it from scratch with plain Snakemake (world, download, training, evaluation, each job a process
of its own) to check that their evaluation JSONs are byte-identical.
"""

import json
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import tarfile

import pandas as pd
import pytest
import scipy.stats
from helpers import REPO, repo_params, snapshot_repo

pytestmark = pytest.mark.e2e
DEMO_TIMEOUT = 3600


def make_env() -> dict:
    """The caller's environment without the outer venv, but with the uv the outer `make` used."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "DINORANKCLIP_PARAMS_JSON")}
    uv = shutil.which("uv") or str(REPO / ".tools" / "bin" / "uv")
    venv_bin = str(REPO / ".venv" / "bin")
    env["PATH"] = os.pathsep.join([os.path.dirname(uv)] + [p for p in env["PATH"].split(os.pathsep) if p != venv_bin])
    return env


def sh(cmd: list[str], cwd, timeout=600, activate=False) -> subprocess.CompletedProcess:
    """Run `cmd` in the clone; `activate` puts the clone's .venv/bin first on PATH, as `source .venv/bin/activate`."""
    env = make_env()
    if activate:
        env["PATH"] = f"{cwd / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    clone = snapshot_repo(tmp_path_factory.mktemp("demo"))
    result = sh(["make", "demo"], clone, timeout=DEMO_TIMEOUT)
    return clone, result.stdout


def evaluations(clone, run="clip", seed=0) -> dict[str, dict]:
    folder = clone / "results/demo/evaluate" / run / f"seed{seed}"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def seeds(run: str) -> list[int]:
    from dinorankclip.config import run_seeds

    return run_seeds(repo_params(), "demo", run)


def seed_values(clone, run: str, bench: str, key: str) -> list[float]:
    """One metric of a run, per seed, from its evaluation JSONs."""
    return [evaluations(clone, run, seed)[bench]["metrics"][key] for seed in seeds(run)]


def seed_mean(clone, run: str, bench: str, key: str) -> float:
    """The mean over a run's seeds of one metric, as the report computes it (math.fsum / n)."""
    values = seed_values(clone, run, bench, key)
    return math.fsum(values) / len(values)


def test_make_demo_prints_the_table_and_where_the_results_are(demo):
    clone, stdout = demo
    assert "| clip |" in stdout
    assert "table:   results/demo/report/main.md" in stdout and "figure:  results/demo/report/main.png" in stdout
    assert (clone / "results/demo/report/main.png").stat().st_size > 10_000


def test_clip_beats_twice_chance_on_colour_and_shape(demo):
    results = evaluations(demo[0])
    for bench in ("demo-colour", "demo-shape"):
        chance = 1 / len(results[bench]["classnames"])
        assert results[bench]["metrics"]["acc1"] >= 2 * chance, (bench, results[bench]["metrics"])


def test_table_numbers_are_the_seed_means_of_the_evaluation_jsons(demo):
    clone, _ = demo
    table = pd.read_csv(clone / "results/demo/report/main.csv", index_col="run", float_precision="round_trip")
    compute = table.pop("train PFLOP")  # matched compute: exact training FLOPs from metrics.json
    pretrain = json.loads((clone / "results/demo/pretrain/clip/seed0/metrics.json").read_text())
    assert compute["clip"] == pytest.approx(pretrain["train_flops"] / 1e15, rel=1e-12) and compute["clip"] > 0
    finetune = json.loads((clone / "results/demo/finetune/clip-kuea/seed0/metrics.json").read_text())
    assert compute["clip-kuea"] == pytest.approx((pretrain["train_flops"] + finetune["train_flops"]) / 1e15, rel=1e-9)
    assert table.loc["clip", "seeds"] == 3 and table.loc["cyclip", "seeds"] == 1
    metrics = [c for c in table.columns if c != "seeds" and not c.endswith("±95%")]
    for column in metrics:
        bench, label = column.split(" ", 1)
        key = {"top-1": "acc1", "T→I R@1": "image_retrieval_recall@1", "I→T R@1": "text_retrieval_recall@1"}[label]
        assert table.loc["clip", column] == pytest.approx(seed_mean(clone, "clip", bench, key), rel=1e-12), column
        # the half-width of the t-interval over clip's seeds (0 where every seed scores the same, e.g. 100% colour)
        values = seed_values(clone, "clip", bench, key)
        half = scipy.stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
        assert table.loc["clip", f"{column} ±95%"] == pytest.approx(half, rel=1e-9, abs=1e-15), column
        assert pd.isna(table.loc["cyclip", f"{column} ±95%"])
    assert set(evaluations(clone)) == {c.split(" ")[0] for c in metrics}
    text = (clone / "results/demo/report/main.md").read_text()
    assert "demo-shape n = 400" in text and "3 seeds: clip, drc-r1, drc-r3, drc-r3-fusion-v1, distill-only" in text


def test_download_stats_count_the_planted_faults_and_no_bad_sample_is_stored(demo):
    clone, _ = demo
    planted = json.loads((clone / "results/demo/source/planted.json").read_text())
    stats = json.loads((clone / "results/demo/data/stats.json").read_text())
    assert (stats["dead_links"], stats["corrupt"], stats["stored"]) == (
        planted["dead_links"], planted["corrupt_files"], planted["train_images"])
    assert json.loads((clone / "results/demo/source/source_stats.json").read_text())["malformed"] == \
        planted["malformed_rows"]
    urls = []
    for shard in sorted((clone / "results/demo/data/shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            urls += [json.load(tar.extractfile(m))["url"] for m in tar if m.name.endswith(".json")]
    assert len(urls) == planted["train_images"] and all("/train/" in u for u in urls)


def test_mlflow_store_holds_every_job_with_its_metrics(demo):
    clone, _ = demo
    db = sqlite3.connect(clone / "results/demo/mlflow.db")
    runs = dict(db.execute("select name, status from runs"))
    registry = list(repo_params()["runs"])
    tuned = list(repo_params()["finetune_runs"])
    jobs = ["source", "data", "teacher-weights", "teacher", "captions", "report"] + [
        f"{s}/{r}/seed{k}" for s in ("pretrain", "evaluate") for r in registry for k in seeds(r)]
    jobs += [f"{s}/{r}/seed{k}" for s in ("finetune", "evaluate") for r in tuned for k in seeds(r)]
    assert runs == dict.fromkeys(jobs + ["study/demo"], "FINISHED")
    parent = db.execute("select run_uuid from runs where name = 'study/demo'").fetchone()[0]
    children = dict(db.execute("select r.name, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
                               "where t.key = 'mlflow.parentRunId'"))
    assert children == dict.fromkeys(jobs, parent)
    keys = dict(db.execute("select m.key, count(distinct m.step) from metrics m join runs r on "
                           "m.run_uuid = r.run_uuid where r.name = 'pretrain/drc-r3/seed1' group by m.key"))
    assert keys["loss"] >= 10 and keys["val_loss"] == repo_params()["studies"]["demo"]["pretrain"]["epochs"]
    for key in ("lr", "logit_scale", "grad_norm", "samples_per_s", "samples_per_s_per_device", "data_wait_fraction",
                "mfu", "loss/distill_feature", "injection/alpha", "injection/angle_deg", "injection/conflict_share",
                "transition/gamma_3", "transition/strength_2", "val_objective", "val/injection/angle_deg",
                "final/train_flops", "final/device_hours"):
        assert keys.get(key, 0) >= 1, key
    assert any(k.startswith("system/cpu_utilization") for k in keys), sorted(keys)


def test_alip_and_tips_style_train_on_the_second_captions_and_reach_the_main_table(demo):
    clone, _ = demo
    root = clone / "results/demo"
    coverage = json.loads((root / "captions/coverage.json").read_text())
    planted = json.loads((root / "source/planted.json").read_text())
    assert coverage["covered"] == coverage["images"] == planted["train_images"] and coverage["unused_entries"] == 0
    db = sqlite3.connect(root / "mlflow.db")

    def logged(run):
        return {k for (k,) in db.execute("select distinct m.key from metrics m join runs r on m.run_uuid = r.run_uuid "
                                         "where r.name = ?", (f"pretrain/{run}/seed0",))}

    assert {"loss/alip_text", "loss/alip_caption", "loss/lcg_fired"} <= logged("alip")
    assert "loss/patch" in logged("tips-style")
    table = pd.read_csv(root / "report/main.csv", index_col=0)
    assert {"alip", "tips-style"} <= set(table.index)


def test_order_sweep_table_covers_orders_zero_to_four_with_the_json_values_and_gates(demo):
    clone, _ = demo
    sweep = pd.read_csv(clone / "results/demo/report/order_sweep.csv", index_col="R", float_precision="round_trip")
    assert list(sweep.index) == [0, 1, 2, 3, 4] and list(sweep["run"]) == [f"drc-r{r}" for r in range(5)]
    for r in range(5):
        assert sweep.loc[r, "demo-shape top-1"] == pytest.approx(seed_mean(clone, f"drc-r{r}", "demo-shape", "acc1"),
                                                                 rel=1e-12)
    for r in range(2, 5):  # every transition gate of every order, as the last validation measured it
        strength = [json.loads((clone / f"results/demo/pretrain/drc-r{r}/seed{k}/metrics.json").read_text())[
            "strength"] for k in seeds(f"drc-r{r}")]
        for q in range(2, r + 1):
            gammas = [s[f"transition/gamma_{q}"] for s in strength]
            assert sweep.loc[r, f"γ_{q}"] == pytest.approx(math.fsum(gammas) / len(gammas), rel=1e-12)
        acted = [any(abs(s[f"transition/gamma_{q}"]) >= 0.02 for q in range(2, r + 1)) for s in strength]
        assert sweep.loc[r, "acted (γ beyond ±0.02)"] == pytest.approx(sum(acted) / len(acted))
    assert pd.isna(sweep.loc[1, "γ_2"]) and pd.isna(sweep.loc[2, "γ_3"])  # order R has gates 2..R only
    assert (clone / "results/demo/report/order_sweep.png").stat().st_size > 10_000


def test_fusion_ablation_table_covers_the_variants_the_control_and_their_strength(demo):
    clone, _ = demo
    table = pd.read_csv(clone / "results/demo/report/fusion_ablation.csv", index_col="variant",
                        float_precision="round_trip")
    assert [label.split()[0] for label in table.index] == ["V1", "V1", "V2", "V3", "V4", "V5", "V6", "chance"]
    runs = dict(zip(table.index[:-1], table["run"][:-1], strict=True))
    assert runs["V5 +conflict-aware gate"] == "drc-r3-fusion-v5 = drc-r3" and runs["V1 no injection"] == \
        "drc-r3-fusion-v1" and runs["V1 +distillation (control)"] == "distill-only"
    assert not (clone / "results/demo/pretrain/drc-r3-fusion-v5").exists()  # one run, two names
    for label, run in runs.items():
        run = run.split(" = ")[-1]
        assert table.loc[label, "demo-shape top-1"] == pytest.approx(seed_mean(clone, run, "demo-shape", "acc1"),
                                                                     rel=1e-12)
    for run in ("drc-r3", "drc-r3-fusion-v2", "drc-r3-fusion-v6"):
        strength = json.loads((clone / f"results/demo/pretrain/{run}/seed0/metrics.json").read_text())["strength"]
        assert strength["injection/angle_deg"] > 0 and strength["injection/residual_ratio"] > 0, run
    assert pd.isna(table.loc["V1 no injection", "∠(z, z_g) °"])  # nothing injected, nothing measured
    assert table.loc["V5 +conflict-aware gate", "α"] != 1.0  # α trained
    teacher = json.loads((clone / "results/demo/teacher/stats.json").read_text())
    assert teacher["checked"] and teacher["images"] == 8000 and teacher["bytes_per_image"] < 80_000


def test_declared_comparisons_are_tested_and_marked(demo):
    clone, _ = demo
    p_values = pd.read_csv(clone / "results/demo/report/comparisons_p.csv", index_col="comparison")
    declared = [f"{c['run']} − {c['against']}".replace("drc-r3-fusion-v5", "drc-r3")
                for c in repo_params()["report"]["comparisons"]]
    assert list(p_values.index) == declared
    assert set(p_values["test"]) <= {"paired t", "paired t, none (identical differences: t undefined)"}
    main = (clone / "results/demo/report/main.md").read_text()
    differences = pd.read_csv(clone / "results/demo/report/comparisons.csv", index_col="comparison")
    for comparison in declared:  # a significant improvement is bold in the run's row of the main table
        run = comparison.split(" − ")[0]
        row = next(line for line in main.splitlines() if line.startswith(f"| {run} |"))
        significant = (p_values.loc[comparison].drop("test") < 0.05).any()
        assert ("*" in row) >= significant, (comparison, row)
        assert list(differences.columns).count("seeds") == 1


def test_kuea_lowers_the_kernel_loss_keeps_the_text_tower_and_retrieval_within_two_points(demo):
    from safetensors.torch import load_file

    clone, _ = demo
    with tarfile.open(clone / "results/demo/source/eval/wds_demo-retrieval/test/0.tar") as tar:
        assert sum(m.name.endswith(".jpg") for m in tar) >= 1000  # the retrieval split the criterion is stated on
    table = pd.read_csv(clone / "results/demo/report/kuea.csv", index_col="KUEA", float_precision="round_trip",
                        keep_default_na=False)
    columns = {"image_retrieval_recall@1": "demo-retrieval T→I R@1",
               "text_retrieval_recall@1": "demo-retrieval I→T R@1"}
    for run, start in repo_params()["finetune_runs"].items():
        firsts, lasts = [], []
        for seed in seeds(run):
            out = clone / "results/demo/finetune" / run / f"seed{seed}"
            metrics = json.loads((out / "metrics.json").read_text())
            assert metrics["start_run"] == start and metrics["frozen_unchanged"] and metrics["reg_first"] == 0.0
            assert metrics["kernel_loss_last"] < metrics["kernel_loss_first"], (run, metrics)
            firsts.append(metrics["kernel_loss_first"])
            lasts.append(metrics["kernel_loss_last"])
            weights = "model/open_clip_model.safetensors"
            before, after = (load_file(str(d / weights)) for d in (clone / f"results/demo/pretrain/{start}/seed{seed}",
                                                                    out))
            assert all(before[k].equal(after[k]) for k in before if not k.startswith("visual."))
            start_r, tuned_r = (evaluations(clone, r, seed)["demo-retrieval"]["metrics"] for r in (start, run))
            for key in columns:
                assert abs(tuned_r[key] - start_r[key]) <= 0.02, (run, seed, key, start_r[key], tuned_r[key])
        assert table.loc[f"{run} before", "kernel loss"] == pytest.approx(math.fsum(firsts) / len(firsts))
        assert table.loc[f"{run} after", "kernel loss"] == pytest.approx(math.fsum(lasts) / len(lasts))
        for key, column in columns.items():
            assert table.loc[f"{run} after", column] == pytest.approx(seed_mean(clone, run, "demo-retrieval", key))
    assert "kernel loss" in (clone / "results/demo/report/kuea.md").read_text()


def test_probe_and_modality_gap_cover_every_run_with_the_json_values(demo):
    clone, _ = demo
    runs = list(repo_params()["runs"]) + list(repo_params()["finetune_runs"])
    probe = pd.read_csv(clone / "results/demo/report/probe.csv", index_col="run", float_precision="round_trip")
    gap = pd.read_csv(clone / "results/demo/report/modality_gap.csv", index_col="run", float_precision="round_trip")
    assert list(gap.index) == runs and list(probe.index) == runs + ["chance"]
    for run in ("clip", "drc-r3"):
        lp = [json.loads((clone / f"results/demo/evaluate/{run}/seed{k}/linear_probe/demo-shape.json").read_text())[
            "metrics"]["lp_acc1"] for k in seeds(run)]
        assert probe.loc[run, "demo-shape linear probe"] == pytest.approx(math.fsum(lp) / len(lp), rel=1e-12)
    assert pd.isna(gap.loc["clip", "d(z_g, z)"]) and gap.loc["drc-r3", "d(z_g, z)"] >= 0  # z_g only when injected
    assert (clone / "results/demo/report/modality_gap.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def teacher_control(demo, tmp_path_factory) -> dict:
    """The positive control of issue 17 (tests/teacher_control.py): V5 on a frozen random trunk, trained with the
    true teacher features and with the same features shuffled across images."""
    from teacher_control import control

    clone, _ = demo
    result = control(clone / "results/demo", tmp_path_factory.mktemp("control"))
    print(json.dumps(result))
    return result


def test_branch_l_learns_the_true_teachers_maps_and_not_shuffled_ones(teacher_control):
    """Distillation works: image-specific maps are predictable from the image, shuffled ones only on average
    (measured: last feature loss 0.10 true, 0.51 shuffled, from 0.97 for both)."""
    last = teacher_control["distill_feature_last"]
    assert last["true"] < 0.5 * last["shuffled"], last


@pytest.mark.xfail(strict=True, reason=(
    "issue 17: the control fails on the demo world (true 36.8% vs shuffled 38.5% demo-shape top-1). Linear probes "
    "on demo-shape: the teacher's cached maps 47%, its CLS 22.8%, the frozen random trunk's z_g 36%, branch L's "
    "distilled maps 39.5% (35.8% shuffled), the injected delta 26.8% (28.5%): the stand-in teacher says little more "
    "about these images than a random trunk, and branch L keeps 3.5 of its 11 points. README, 'Positive control'."))
def test_the_teacher_pathway_carries_information_a_frozen_trunk_cannot_get_elsewhere(teacher_control):
    """The threshold was fixed in advance at 10 points, outside the ±4.8-point noise of a 400-image suite, and is
    not moved: strict, so the day the pathway passes this test reports it."""
    assert teacher_control["margin"] >= 0.10, teacher_control


def test_reference_compare_reads_the_committed_record(demo):
    clone, _ = demo
    out = sh(["dinorankclip", "reference", "compare", "--json", "comparison.json"], clone, activate=True).stdout
    table = json.loads((clone / "comparison.json").read_text())
    runs = len(repo_params()["runs"]) + len(repo_params()["finetune_runs"])
    assert len(table) == runs * 7  # every run, every headline metric (five top-1 columns, two retrieval R@1)
    assert "cells outside the reference's 95% intervals" in out


def test_second_make_demo_does_no_work_and_dvc_sees_everything_up_to_date(demo):
    clone, _ = demo
    result = sh(["make", "demo"], clone)
    log = result.stdout + result.stderr  # snakemake reports on stderr
    assert "Nothing to be done" in log and "Finished jobid" not in log
    assert "Data and pipelines are up to date." in sh(["dvc", "status"], clone, activate=True).stdout


def test_dvc_repro_rebuilds_a_stage_identically(demo):
    clone, _ = demo
    report = clone / "results/demo/report"
    before = (report / "main.csv").read_bytes()
    shutil.rmtree(report)
    # unchanged inputs: `dvc checkout` restores the deleted output from DVC's cache (recorded by `dvc commit`);
    # persistent outputs are not restored by `dvc repro` from the run cache, so checkout is the way
    checkout = sh(["dvc", "checkout", "report"], clone, activate=True)
    assert "results/demo/report" in checkout.stdout + checkout.stderr
    assert (report / "main.csv").read_bytes() == before
    assert "Data and pipelines are up to date." in sh(["dvc", "status"], clone, activate=True).stdout
    # forced: it runs the stage's command, and only that stage
    stdout = sh(["dvc", "repro", "--force", "--single-item", "report"], clone, activate=True).stdout
    assert stdout.count("Running stage") == 1 and "Running stage 'report'" in stdout
    assert (report / "main.csv").read_bytes() == before


def test_demo_from_scratch_again_gives_byte_identical_evaluations(demo):
    clone, _ = demo
    runs = ["clip", "drc-r3"]  # a baseline and a high-order run; every run is trained the same way

    def snapshot():
        return {(r, p.name): p.read_bytes() for r in runs
                for p in (clone / "results/demo/evaluate" / r / "seed0").glob("*.json")}

    first = snapshot()
    shutil.rmtree(clone / "results")
    shutil.rmtree(clone / ".snakemake")
    sh(["snakemake"] + [f"results/demo/evaluate/{r}/seed0" for r in runs], clone, timeout=DEMO_TIMEOUT, activate=True)
    assert snapshot() == first and len(first) == 2 * 6
