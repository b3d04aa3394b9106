"""The paper study at CI size (studies/preflight.yaml) on the paper's own code paths, then `dinorankclip preflight`
on it.

Inputs (tests/preflight_world.py) sit where the paper study expects them; the caption list and its images are
served on 127.0.0.1. As root, the study runs through `--profile slurm` on the test cluster (tests/slurm_cluster.py)
one job at a time, and `clip` runs again on 2 ranks (torchrun, gloo) in a job that asks for 2 GPUs; what sbatch
received is read back with scontrol. Without root (no test cluster) the same jobs run locally and the SLURM part is
skipped. The jobs: the data stage on 16 images in real-world formats with 2 dead links, the DINOv3 ViT-B/16 teacher
read from a seeded safetensors file, one step of `clip` and `drc-r3` with ViT-B-16 towers at 224 px and batch 2,
one KUEA step of `drc-r3` on an image folder, and `drc-r3` evaluated on one suite of each task kind.
"""

import json
import os
import subprocess

import pytest
import yaml
from helpers import REPO, free_port, snakemake, snapshot_repo, venv_env
from preflight_world import CIFAR10, DEAD, MALFORMED, SERVED, VALIDATION_SERVED, write_preflight_inputs
from slurm_cluster import Cluster, memory_mb, scontrol, submissions

from dinorankclip.data.server import serve_directory
from dinorankclip.models.teacher import sha256
from dinorankclip.preflight.disk import member_bytes

pytestmark = pytest.mark.e2e
TEST_PROFILE = REPO / "tests" / "slurm_profile"
TARGETS = ["results/preflight/captions", "results/preflight/pretrain/clip/seed0",
           "results/preflight/finetune/drc-r3-kuea/seed0", "results/preflight/evaluate/drc-r3/seed0"]
PARAMS = ["--params", "params.yaml", "--params", "studies/preflight.yaml", "--params", "preflight-port.yaml"]
# what each job of the study asks of a node: its CPUs (threads + loader workers of each rank), memory and GPUs
REQUESTS = {"data": (1, 32000, None), "teacher_weights": (2, 16000, None), "teacher": (2, 64000, "gres:gpu:1"),
            "captions": (1, 32000, None), "pretrain": (2, 60000, None), "finetune": (2, 64000, "gres:gpu:1"),
            "evaluate": (2, 64000, "gres:gpu:1")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    clone = snapshot_repo(tmp_path_factory.mktemp("preflight"))
    www, port = tmp_path_factory.mktemp("www"), free_port()
    planted = write_preflight_inputs(clone, www, port)
    with serve_directory(www, port):
        yield clone, planted


@pytest.fixture(scope="module")
def cluster():
    """The one-node test cluster as root; None elsewhere (the study then runs locally)."""
    if os.geteuid() != 0:
        yield None
        return
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def through(cluster, *extra: str) -> list[str]:
    """The study's files (and `extra` ones) and how its jobs run: one at a time, locally on one core, or on the
    cluster one queued job and --cores 1, which would cap every job's threads at 1 if CPUs reached sbatch as
    threads. On the cluster the download is a cluster job too (`data.cluster_job`: its compute node is this host,
    which serves the list)."""
    files = ["studies/preflight.yaml", "preflight-port.yaml", *(["cluster-data.yaml"] if cluster else []), *extra]
    slurm = ["--profile", "slurm", "--profile", str(TEST_PROFILE), "--jobs", "1"] if cluster else []
    return ["--cores", "1", *slurm, "--configfile", *files, "--config", "study=preflight"]


@pytest.fixture(scope="module")
def study(world, cluster):
    clone, planted = world
    (clone / "cluster-data.yaml").write_text("studies: {preflight: {data: {cluster_job: true}}}\n")
    log = snakemake(clone, [*TARGETS, *through(cluster)], timeout=1500)
    one_rank = json.loads((clone / "results/preflight/pretrain/clip/seed0/metrics.json").read_text())
    return clone, planted, log, one_rank


def test_the_data_stage_stores_every_real_world_format_and_counts_the_dead_links(study):
    clone, planted, _, _ = study
    source = json.loads((clone / "results/preflight/source/source_stats.json").read_text())
    assert (source["rows"], source["kept"], source["malformed"]) == (planted["rows"], SERVED + DEAD, MALFORMED)
    stats = json.loads((clone / "results/preflight/data/stats.json").read_text())
    assert (stats["urls"], stats["stored"], stats["dead_links"], stats["corrupt"]) == (SERVED + DEAD, SERVED, DEAD, 0)
    val = stats["validation"]  # the study's validation list (METHOD 6a), downloaded beside the training pairs
    assert (val["urls"], val["stored"], val["dead_links"]) == (VALIDATION_SERVED + 1, VALIDATION_SERVED, 1)


def test_the_teacher_is_the_paper_architecture_read_from_the_seeded_file(study):
    clone, _, _, _ = study
    path = clone / "weights/dinov3/vit_base_patch16_dinov3.lvd1689m.safetensors"
    weights = json.loads((clone / "results/preflight/teacher_weights/stats.json").read_text())
    assert weights == {"from": "file", "file": str(path.relative_to(clone)), "sha256": sha256(path)}
    cache = json.loads((clone / "results/preflight/teacher/stats.json").read_text())
    assert (cache["images"], cache["model"], cache["blocks"], cache["grid"], cache["patch_channels"]) == (
        SERVED, "vit_base_patch16_dinov3.lvd1689m", [5, 8, 11], 7, 256)
    coverage = json.loads((clone / "results/preflight/captions/coverage.json").read_text())
    assert (coverage["images"], coverage["covered"]) == (SERVED, SERVED)


def test_one_step_of_each_run_with_the_paper_towers_and_its_state_pruned(study):
    clone, _, _, one_rank = study
    for run in ("clip", "drc-r3"):
        out = clone / f"results/preflight/pretrain/{run}/seed0"
        metrics = one_rank if run == "clip" else json.loads((out / "metrics.json").read_text())
        assert (metrics["steps"], metrics["samples_seen"], metrics["epochs"]) == (1, 2, 1)
        for export in ("model", "best"):
            config = json.loads((out / export / "open_clip_config.json").read_text())
            assert config["arch"] == "ViT-B-16" and config["model_cfg"]["vision_cfg"]["image_size"] == 224
        assert ("injection" in config) == (run == "drc-r3")
        assert not (clone / f"results/preflight/state/pretrain/{run}/seed0").exists()  # published, then pruned
    assert "loss.window" not in (clone / "results/preflight/logs/pretrain/drc-r3/seed0.log").read_text()


def test_kuea_takes_one_step_on_the_image_folder(study):
    clone, _, _, _ = study
    out = clone / "results/preflight/finetune/drc-r3-kuea/seed0"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["finetune"]["data"] == {"kind": "folder", "path": "data/imagenet/train"}
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1
    assert json.loads((out / "model/open_clip_config.json").read_text())["injection"]["variant"] == "v5"


def test_drc_r3_is_evaluated_on_one_suite_of_each_task_kind(study):
    clone, _, _, _ = study
    out = clone / "results/preflight/evaluate/drc-r3/seed0"
    cifar = json.loads((out / "vtab-cifar10.json").read_text())
    assert cifar["classnames"] == CIFAR10 and 0 <= cifar["metrics"]["acc1"] <= 1
    coco = json.loads((out / "mscoco_captions.json").read_text())
    assert {"image_retrieval_recall@1", "text_retrieval_recall@5"} <= set(coco["metrics"])
    probe = json.loads((out / "linear_probe/vtab-pets.json").read_text())
    assert probe["task"] == "linear_probe" and len(probe["classnames"]) == 37 and probe["classnames"][0] == "Abyssinian"
    assert json.loads((out / "modality_gap/mscoco_captions.json").read_text())["task"] == "modality_gap"


def test_sbatch_received_the_cpus_memory_and_gpus_each_job_asks(study, cluster):
    if cluster is None:
        pytest.skip("no SLURM test cluster (needs root): the study ran locally")
    _, _, log, _ = study
    jobs = submissions(log)
    assert sorted(rule for _, rule in jobs) == sorted(
        ["data", "teacher_weights", "teacher", "captions", "pretrain", "pretrain", "finetune", "evaluate"])
    assert "localrule source:" in log and "localrule data:" not in log
    for job, rule in jobs:
        info = scontrol(cluster, job)
        assert (int(info["NumCPUs"]), memory_mb(info["MinMemoryNode"]), info.get("TresPerJob")) == REQUESTS[rule], rule


@pytest.fixture(scope="module")
def two_ranks(study, cluster):
    """`clip` again, on 2 ranks: the same study with `gpus_per_node: 2`, its pretraining job sent through sbatch."""
    if cluster is None:
        pytest.skip("no SLURM test cluster (needs root)")
    clone, _, _, _ = study
    (clone / "two-ranks.yaml").write_text("studies: {preflight: {pretrain: {gpus_per_node: 2}}}\n")
    log = snakemake(clone, [TARGETS[1], *through(cluster, "two-ranks.yaml")], timeout=900, log=clone / "two-ranks.log")
    return clone, log


def test_clip_on_two_ranks_asks_for_two_gpus_and_takes_the_same_step(two_ranks, study, cluster):
    clone, log = two_ranks
    _, _, _, one_rank = study
    [(job, rule)] = submissions(log)
    info = scontrol(cluster, job)
    # 2 ranks x (2 threads + 0 workers) CPUs, 2 x 60 GB, 2 GPUs (placeholders: torch finds no CUDA, gloo on CPU)
    assert (rule, info["NumCPUs"], memory_mb(info["MinMemoryNode"]), info["TresPerJob"]) == (
        "pretrain", "4", 120000, "gres:gpu:2")
    metrics = json.loads((clone / "results/preflight/pretrain/clip/seed0/metrics.json").read_text())
    assert (metrics["world_size"], metrics["steps"], one_rank["world_size"]) == (2, 1, 1)
    # the global batch of 2 split over 2 ranks: the same loss before the step and after it
    assert metrics["final_epoch_train_loss"] == pytest.approx(one_rank["final_epoch_train_loss"], rel=1e-5)
    assert metrics["val_loss"] == pytest.approx(one_rank["val_loss"], rel=1e-5)


def test_the_preflight_command_passes_on_the_study_and_measures_what_the_stages_wrote(study):
    clone, _, _, _ = study
    result = subprocess.run(["dinorankclip", *PARAMS, "preflight", "--study", "preflight", "--json", "preflight.json",
                             "--sample", str(SERVED + DEAD)], cwd=clone, env=venv_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((clone / "preflight.json").read_text())
    checks = {check["name"]: check for check in report["checks"]}
    assert report["ok"] and not any(check["status"] == "fail" for check in checks.values())
    assert checks["caption list"]["values"]["pairs"] == SERVED + DEAD  # 1 malformed row of 19: a warning
    assert checks["second captions"]["values"]["covered"] == SERVED + DEAD
    assert {name for name, check in checks.items() if check["status"] == "ok"} >= {
        "validation list", "teacher weights", "suite wds/vtab/cifar10",
        "suite wds/mscoco_captions", "suite wds/vtab/pets", "KUEA images", "disk"}
    assert all(checks[name]["device_only"] and checks[name]["status"] == "skip"
               for name in ("GPUs", "training steps", "projected time"))  # this machine has no GPU
    measured = checks["disk"]["values"]["per_image_bytes"]
    stages = {"teacher cache": "teacher/features", "image shards": "data/shards", "caption shards": "captions/captions"}
    written = {}
    for name, folder in stages.items():
        sizes = [size for tar in (clone / "results/preflight" / folder).glob("*.tar")
                 for size in member_bytes(tar).values()]
        written[name] = sum(sizes) / len(sizes)
    assert measured["teacher cache"] == written["teacher cache"]  # every cache sample has the same size
    assert measured["image shards"] == pytest.approx(written["image shards"], rel=0.05)
    assert measured["caption shards"] == pytest.approx(written["caption shards"], rel=0.05)
