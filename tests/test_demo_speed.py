"""The demo's per-job costs: the in-memory training pairs (bit for bit the streamed ones and open_clip's transform
of each PIL image), saved once per study and loaded by the next job of the same inputs only, the size budget that
keeps the paper path streaming, the start-up line every job logs, and bench/demo_cost.py's table from Snakemake
benchmark files."""

import gc
import json
import logging
import os
import shutil
import subprocess
import sys

import open_clip
import pytest
import torch
from helpers import REPO, make_image_shards, repo_params, write_features
from safetensors.torch import load_file

from dinorankclip import cli
from dinorankclip.config import resolve
from dinorankclip.data.captions import build_captions
from dinorankclip.data.loader import ShardPairs, pair_cache_key, split_transform
from dinorankclip.models.clip import create_clip
from dinorankclip.tracking import NullTracker
from dinorankclip.train import pretrain

pytestmark = pytest.mark.usefixtures("single_thread")
COUNTS = [7, 5]
KEYS = {"00000.tar": [f"00000{i:04d}" for i in range(COUNTS[0])],
        "00001.tar": [f"00001{i:04d}" for i in range(COUNTS[1])]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Image shards with the PIL image each sample decodes to, a teacher cache and second captions."""
    root = tmp_path_factory.mktemp("pairs")
    images = make_image_shards(root / "data", COUNTS)
    features = write_features(root / "teacher", KEYS)
    (root / "captions").mkdir()
    file = root / "synthetic.tsv"
    file.write_text("key\tcaption\n" + "".join(f"{k}\tthe scene {k}, described\n" for k in images if int(k) % 3))
    build_captions({"study": "demo", "captions": {"source": "file", "file": str(file)}}, root / "data",
                   root / "captions-staging", root / "captions")
    return root, images, features, root / "captions" / "captions.json"


@pytest.fixture(scope="module")
def towers():
    _, transform, _ = create_clip("demo-rn-tiny")
    return transform, open_clip.get_tokenizer("demo-rn-tiny")


def pairs(inputs, towers, cache_mb, teacher=True, captions=True, saved_in=None):
    root, _, features, second = inputs
    return ShardPairs(root / "data" / "shards.json", *towers, features if teacher else None,
                      second if captions else None, cache_mb, saved_in)


def test_a_cached_batch_is_the_transform_of_each_pil_image_bit_for_bit(inputs, towers):
    _, images, _, _ = inputs
    transform, tokenizer = towers
    cached = pairs(inputs, towers, 64)
    assert cached.cache is not None and cached.cache.pixels.dtype == torch.uint8
    assert tuple(cached.cache.pixels.shape) == (sum(COUNTS), 32, 32, 3)  # the demo tower's 32x32 crop of 64x64
    batch = cached.__getitems__([9, 0, 4, 11])
    assert batch.keys == ["000010002", "000000000", "000000004", "000010004"]
    expected = torch.stack([transform(images[key]) for key in batch.keys])
    assert batch.images.dtype == expected.dtype and torch.equal(batch.images, expected)
    assert torch.equal(batch.tokens, tokenizer([f"a caption of {key}" for key in batch.keys]))
    second = [f"the scene {k}, described" if int(k) % 3 else f"a caption of {k}" for k in batch.keys]
    assert torch.equal(batch.captions, tokenizer(second))
    assert torch.equal(batch.teacher[:, 0, 0, 0, 0], torch.tensor([int(k) / 1e9 for k in batch.keys],
                                                                   dtype=torch.float16))


@pytest.mark.parametrize("teacher,captions", [(True, True), (False, False)])
def test_every_batch_of_an_epoch_equals_the_streamed_one(inputs, towers, teacher, captions):
    streamed, cached = (pairs(inputs, towers, mb, teacher, captions) for mb in (0, 64))
    assert streamed.cache is None and cached.cache is not None
    order = torch.randperm(len(streamed), generator=torch.Generator().manual_seed(3)).tolist()
    for start in range(0, len(order), 4):
        a, b = streamed.__getitems__(order[start:start + 4]), cached.__getitems__(order[start:start + 4])
        assert a.keys == b.keys
        assert (b.teacher is not None, b.captions is not None) == (teacher, captions)
        for x, y in zip(a[:2] + a[3:], b[:2] + b[3:], strict=True):  # every tensor field of the Batch
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y))


def test_a_saved_cache_is_loaded_by_the_next_job_of_the_same_inputs_and_equals_the_shards_reading(inputs, towers,
                                                                                                   tmp_path, caplog):
    read = pairs(inputs, towers, 64).cache
    with caplog.at_level(logging.INFO, logger="dinorankclip.data.loader"):
        first = pairs(inputs, towers, 64, saved_in=tmp_path).cache
        assert "read in" in caplog.text and "loaded in" not in caplog.text
        caplog.clear()
        loaded = pairs(inputs, towers, 64, saved_in=tmp_path).cache
        assert "loaded in" in caplog.text and "read in" not in caplog.text
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]  # one file, no temporary left
    for cache in (first, loaded):
        assert cache.keys == read.keys and cache.normalize is read.normalize
        for x, y in zip(read[:2] + read[3:5], cache[:2] + cache[3:5], strict=True):  # pixels, tokens, teacher, captions
            assert x.dtype == y.dtype and torch.equal(x, y)
    # other inputs (no teacher maps, no second captions) are another file; a smaller budget streams, as before
    plain = pairs(inputs, towers, 64, teacher=False, captions=False, saved_in=tmp_path).cache
    assert plain.teacher is None and plain.captions is None and len(list(tmp_path.iterdir())) == 2
    assert pairs(inputs, towers, 0.001, saved_in=tmp_path).cache is None


def test_the_saved_cache_key_changes_with_any_shard_byte_and_with_the_transform(inputs, towers, tmp_path):
    root = inputs[0]
    copy = tmp_path / "copy"
    for part in ("data", "teacher", "captions"):
        shutil.copytree(root / part, copy / part)
    copied = (copy, inputs[1], copy / "teacher" / inputs[2].name, copy / "captions" / inputs[3].name)
    transform = towers[0]
    key = pair_cache_key(pairs(copied, towers, 0), split_transform(transform)[0])
    assert key == pair_cache_key(pairs(inputs, towers, 0), split_transform(transform)[0])  # bytes, not paths
    # the last byte of a tar's zero padding: no sample changes, the key does
    shard = copy / "teacher" / "features" / "00001.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert pair_cache_key(pairs(copied, towers, 0), split_transform(transform)[0]) != key
    smaller = type(transform)([open_clip.transform.ResizeKeepRatio(16), *transform.transforms[1:]])
    assert pair_cache_key(pairs(inputs, towers, 0), split_transform(smaller)[0]) != key


def test_pairs_over_the_budget_stream(inputs, towers, caplog):
    # per sample: 32x32x3 uint8 pixels, two rows of 24 int64 token ids, 3x8x2x2 fp16 teacher maps
    need_mb = sum(COUNTS) * (32 * 32 * 3 + 2 * 24 * 8 + 3 * 8 * 2 * 2 * 2) / 2**20
    with caplog.at_level(logging.INFO, logger="dinorankclip.data.loader"):
        assert pairs(inputs, towers, need_mb * 0.999).cache is None
    assert "streamed from the shards" in caplog.text
    assert pairs(inputs, towers, need_mb).cache is not None


def test_a_transform_that_cannot_be_cached_exactly_names_the_key(inputs, towers):
    transform, tokenizer = towers
    steps = transform.transforms
    for odd in (type(transform)(steps[:-1]), type(transform)(steps[:-1] + [lambda x: x * 2, steps[-1]]), str):
        with pytest.raises(ValueError, match=r"(?s)pretrain.sample_cache_mb: the image transform .* does not end in "
                                             r"ToTensor \+ Normalize"):
            pairs(inputs, (odd, tokenizer), 64)


def test_pretraining_on_cached_pairs_ends_on_the_same_weights(inputs, tmp_path):
    root = inputs[0]
    weights = {}
    # streamed; held in memory; held in memory and saved; loaded from what the previous job saved
    for name, mb, saved_in in (("streamed", 0, None), ("memory", 64, None), ("saved", 64, tmp_path / "samples"),
                               ("loaded", 64, tmp_path / "samples")):
        cfg = resolve(repo_params(), "demo", "drc-r3")
        cfg["pretrain"].update(epochs=1, batch_size=4, val_samples=4, checkpoint_every=0, log_every=1, threads=1,
                               warmup_steps=1, sample_cache_mb=mb)
        out = tmp_path / name
        out.mkdir()
        pretrain.pretrain(cfg, root / "data", {"teacher": root / "teacher", "captions": root / "captions"}, out,
                          NullTracker(), tmp_path / "state" / name, saved_in)
        weights[name] = load_file(out / "model" / "open_clip_model.safetensors")
    assert len(list((tmp_path / "samples").iterdir())) == 1
    for name in ("memory", "saved", "loaded"):
        assert weights[name].keys() == weights["streamed"].keys()
        assert all(torch.equal(weights["streamed"][k], weights[name][k]) for k in weights[name])


def test_the_start_up_line_states_the_seconds_since_the_process_started():
    code = ("import logging, time; from dinorankclip import cli; time.sleep(1.5); "
            "logging.basicConfig(level=logging.INFO, format='%(message)s'); cli.log_startup()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    found = cli.STARTUP.search(done.stderr)
    assert found, done.stderr
    assert 1.5 <= float(found["wall"]) < 60
    assert 0 < float(found["cpu"]) < float(found["wall"])  # sleeping costs no CPU


HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def study_results(root, jobs: dict[str, list[tuple]], logs: dict[str, tuple[float, float]]):
    """Benchmark files (rows of (s, max_rss, cpu_time) per job) and job logs (start-up, whole CPU-s) under root."""
    for job, rows in jobs.items():
        path = root / "benchmarks" / f"{job}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(HEADER + "".join(f"{s}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n" for s, rss, cpu in rows))
    for job, (startup, whole) in logs.items():
        path = root / "logs" / f"{job}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("INFO something else\n" + f"INFO dinorankclip: {cli.STARTUP_LINE % (9.5, startup)}\n"
                        f"step 10/240 loss 3.1\nINFO dinorankclip: {cli.FINISHED_LINE % (99.0, whole)}\n")
    return root


def demo_cost(*args):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "demo_cost.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_cost_table_reads_benchmarks_and_the_logged_split(tmp_path):
    this = study_results(tmp_path / "this", {  # the (run, seed) layout, against a commit from before it
        "pretrain/clip/seed0": [(100, 1000, 60)], "pretrain/drc-r3/seed1": [(120, 1200, 80)],
        "evaluate/clip/seed0": [(20, 900, 14)],
        "evaluate/drc-r3/seed1": [(22, 950, 15), (26, 950, 17)],  # repeats: their mean
        "report/report": [(5, "NA", "NA")]},  # too short for Snakemake to sample
        {"pretrain/clip/seed0": (10.0, 70.0), "pretrain/drc-r3/seed1": (12.0, 90.0)})
    other = study_results(tmp_path / "other", {
        "pretrain/clip": [(200, 1000, 100)], "pretrain/drc-r3": [(240, 1000, 140)],
        "evaluate/clip": [(40, 900, 30)], "evaluate/drc-r3": [(48, 900, 30)]}, {})
    out = demo_cost(this, "--compare", other, "--out", tmp_path / "cost.json").splitlines()
    assert out[1:6] == [
        "stage     jobs  CPU-s/job   min   max  CPU-s all  wall-s/job  start-up  work  RSS MB",
        "evaluate     2       15.0  14.0  16.0       30.0        22.0         -     -     950",
        "pretrain     2       80.0  70.0  90.0      160.0       110.0      11.0  69.0    1200",
        "report       1          -     -     -          -         5.0         -     -       -",
        "all          5       47.5  14.0  90.0      190.0        53.8      11.0  69.0    1200"]
    # pretrain logs its CPU here but not there: both sides by cpu_time, (60 + 80) / 2 against (100 + 140) / 2
    assert out[8:12] == [
        "stage     CPU/job ratio    measure  wall/job ratio",
        "evaluate           0.50  benchmark            0.50",
        "pretrain           0.58  benchmark            0.50",
        "all                0.57  benchmark            0.41"]
    saved = json.loads((tmp_path / "cost.json").read_text())
    assert saved["stages"]["pretrain"]["cpu_source"] == ["log"] and saved["stages"]["evaluate"]["cpu_source"] == \
        ["benchmark"]
    assert saved["compare"]["ratios"]["pretrain"]["cpu_per_job"] == pytest.approx(70 / 120)


def test_stages_that_log_on_both_sides_are_compared_by_the_logged_cpu(tmp_path):
    logs = {"pretrain/clip": (10.0, 40.0)}
    this = study_results(tmp_path / "this", {"pretrain/clip": [(50, 1, 30)]}, logs)
    other = study_results(tmp_path / "other", {"pretrain/clip": [(90, 1, 50)]}, {"pretrain/clip": (20.0, 80.0)})
    out = demo_cost(this, "--compare", other, "--out", tmp_path / "cost.json").splitlines()
    assert out[-4:-2] == ["pretrain           0.50      log            0.56",
                          "all                0.50      log            0.56"]


def test_forked_jobs_carry_their_share_of_the_fork_servers_loading(tmp_path):
    from dinorankclip.forkserver import FORKED_LINE, SERVED_LINE

    this = study_results(tmp_path / "this", {"pretrain/clip": [(50, 1, 0.2)], "pretrain/drc-r3": [(70, 1, 0.3)]},
                         {"pretrain/clip": (1.0, 30.0), "pretrain/drc-r3": (1.0, 50.0)})
    for job in ("clip", "drc-r3"):  # forked: Snakemake's cpu_time saw only the waiting process
        log = this / "logs" / "pretrain" / f"{job}.log"
        log.write_text(FORKED_LINE + "\n" + log.read_text())
    # two workflow runs: 12 CPU-s of loading over 4 forked jobs (two of them in a run whose jobs are gone)
    (this / "logs" / "forkserver.log").write_text(SERVED_LINE.format(loaded=7.0, served=3, cpu=90.0, refused=1) +
                                                  SERVED_LINE.format(loaded=5.0, served=1, cpu=9.0, refused=0))
    other = study_results(tmp_path / "other", {"pretrain/clip": [(90, 1, 60)], "pretrain/drc-r3": [(110, 1, 100)]}, {})
    out = demo_cost(this, "--compare", other, "--out", tmp_path / "cost.json").splitlines()
    assert out[2] == "pretrain     2       43.0  33.0  53.0       86.0        60.0       1.0  39.0       -"
    assert out[4] == ("2 jobs ran as forks of the fork server: each carries 3.00 CPU-s of its loading, besides its "
                      "own CPU-s")
    assert out[-4:-2] == ["pretrain           0.54    mixed            0.60",
                          "all                0.54    mixed            0.60"]


def test_a_folder_without_benchmarks_is_one_error(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "demo_cost.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == f"error: {tmp_path}/benchmarks: no Snakemake benchmark files " \
                                                   "(<stage>/<job>.tsv)\n"


def test_start_up_runs_without_the_collector_and_leaves_it_as_it_was():
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with cli.startup_gc():
        assert not gc.isenabled()
        cli.log_startup()
        assert gc.isenabled() and gc.get_freeze_count() > 0  # what start-up built is out of the collections
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert cli.main(["--study", "demo", "pretrain", "--run", "not-a-run"]) == 2
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_python_m_ends_with_the_job_status_and_its_whole_output(tmp_path):
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def job(*args):
        return subprocess.run([sys.executable, "-m", "dinorankclip", *args], capture_output=True, text=True,
                              timeout=300, cwd=REPO, env=buffered)

    done = job("check")  # stdout is a pipe, so block-buffered: it must be flushed before the early exit
    assert done.returncode == 0 and done.stdout.startswith("study demo: runs clip, cyclip") and \
        done.stdout.endswith("demo-retrieval\n")
    done = job("--study", "demo", "pretrain", "--run", "not-a-run")
    assert done.returncode == 2 and "error: pretrain --run not-a-run: not a run of study demo" in done.stderr
    # a job that raises ends the ordinary way: its traceback and status 1 (a report with nothing to report)
    (tmp_path / "results" / "demo").mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "dinorankclip", "--params", str(REPO / "params.yaml"), "report"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=buffered)
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr


FAKE_JOB = """#!/bin/bash
# A checkout's python: `-c` prints versions; `-m dinorankclip STAGE --run RUN [--seed K]` is one job, which must find
# its output gone (the bench removes it before each run), writes it, records itself and burns a little CPU.
[ "$1" = "-c" ] && {{ echo "fake {side}"; exit 0; }}
out="results/demo/$3/$5${{7:+/seed$7}}"
[ -e "$out" ] && {{ echo "output left from the last run: $out"; exit 3; }}
mkdir -p "$out" && echo "{side} $3 ${{*:4}}" >> {record}
exec {python} -c "sum(range(2 * 10 ** 6))"
"""


def fake_checkout(root, side, seeded, record):
    """A finished checkout as bench/job_ab.py reads it: .venv/bin/python (FAKE_JOB), results/demo with an MLflow
    store and the job's output, in the (run, seed) layout or the older one."""
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_JOB.format(side=side, record=record, python=sys.executable))
    python.chmod(0o755)
    done = root / "results" / "demo" / "pretrain" / "clip" / ("seed0" if seeded else "")
    done.mkdir(parents=True)
    (done / "model.safetensors").write_bytes(b"weights")
    (root / "results" / "demo" / "mlflow.db").write_bytes(b"store")
    return root


def test_job_ab_runs_each_side_alternately_in_a_scratch_copy_with_its_own_arguments(tmp_path):
    record = tmp_path / "record.txt"
    old = fake_checkout(tmp_path / "old", "old", seeded=False, record=record)
    new = fake_checkout(tmp_path / "new", "new", seeded=True, record=record)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "job_ab.py"), str(old), str(new), "--job",
                           "pretrain:clip", "--reps", "3", "--out", str(tmp_path / "ab.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert record.read_text().splitlines() == [  # A B B A A B; the older layout without --seed
        "old pretrain --run clip", "new pretrain --run clip --seed 0", "new pretrain --run clip --seed 0",
        "old pretrain --run clip", "old pretrain --run clip", "new pretrain --run clip --seed 0"]
    report = json.loads((tmp_path / "ab.json").read_text())
    assert report["versions"] == {"old": "fake old", "new": "fake new"} and report["reps"] == 3
    job = report["jobs"]["pretrain:clip"]
    assert all(job[side]["cpu_s"]["min"] > 0 for side in ("old", "new"))
    assert job["ratio_cpu"] == round(job["new"]["cpu_s"]["mean"] / job["old"]["cpu_s"]["mean"], 3)
    for root, part in ((old, ""), (new, "seed0")):  # the checkouts are untouched: the jobs ran in copies
        assert (root / "results/demo/pretrain/clip" / part / "model.safetensors").read_bytes() == b"weights"
        assert (root / "results/demo/mlflow.db").read_bytes() == b"store"
