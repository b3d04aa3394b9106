"""Multi-node pretraining on a two-node SLURM cluster: two slurmd daemons on this host (tests/slurm_cluster.py), the
reduced demo study's `clip` with `nodes: 2` through `--profile slurm`. The job's command (`launch.training_command`)
runs `srun` with one task per node, each task a torchrun of one CPU rank (gloo) that finds the first node from its
own step; the two ranks take the steps one process takes, to float tolerance (a ViT tower: no batch norm, whose
per-rank statistics would differ)."""

import json
import os
import re
import subprocess

import pytest
from helpers import REPO, copy_clone, snakemake
from slurm_cluster import Cluster, multi_node_names, state_dir

pytestmark = [pytest.mark.slurm, pytest.mark.e2e,
              pytest.mark.skipif(os.geteuid() != 0, reason="slurmd runs jobs as their submitter only as root")]
NAMES = multi_node_names()
TEST_PROFILE = REPO / "tests" / "slurm_profile"
OUTPUT = "results/demo/pretrain/clip/seed0"
VIT = "studies: {demo: {model: {arch: demo-vit-tiny}, pretrain: {max_steps: 6, val_samples: 32}}}\n"


@pytest.fixture(scope="module")
def two_nodes():
    if NAMES is None:
        pytest.skip("this host's name does not resolve to it: the first node could not be reached by name")
    # its own state folder beside the one-node cluster's (munge needs every parent of its socket world-executable,
    # which pytest's temporary folders are not) and its own ports
    cluster = Cluster(state_dir().with_name(f"{state_dir().name}-two-nodes"), nodes=NAMES, ports=(6927, 6928))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_clip_on_two_nodes_one_rank_each_takes_the_steps_of_one_process(two_nodes, reduced_inputs, tmp_path_factory):
    clone = copy_clone(reduced_inputs, tmp_path_factory.mktemp("multinode"))
    (clone / "vit.yaml").write_text(VIT)
    (clone / "two-nodes.yaml").write_text("studies: {demo: {pretrain: {nodes: 2, gpus_per_node: 0}}}\n")
    snakemake(clone, [OUTPUT, "--cores", "1", "--configfile", "vit.yaml"], timeout=600)
    one = json.loads((clone / OUTPUT / "metrics.json").read_text())
    log = snakemake(clone, [OUTPUT, "--profile", "slurm", "--profile", str(TEST_PROFILE), "--configfile", "vit.yaml",
                            "two-nodes.yaml"], timeout=900, log=clone / "two-nodes.log")
    [job] = re.findall(r"submitted with SLURM jobid (\d+)", log)
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env={**os.environ, **two_nodes.env()},
                         capture_output=True, text=True, check=True).stdout
    info = dict(field.split("=", 1) for field in out.split() if "=" in field)
    assert (info["JobState"], info["NumNodes"], info["NumTasks"], info["NodeList"]) == (
        "COMPLETED", "2", "2", ",".join(NAMES))
    two = json.loads((clone / OUTPUT / "metrics.json").read_text())
    assert (two["world_size"], one["world_size"], two["steps"], one["steps"]) == (2, 1, 6, 6)
    assert two["final_epoch_train_loss"] == pytest.approx(one["final_epoch_train_loss"], rel=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert "2 rank(s) on cpu" in (clone / "results/demo/logs/pretrain/clip/seed0.log").read_text()
