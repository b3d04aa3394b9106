"""bench/gpu_suite.py --smoke on the CPU, with only what the GPU machine has importable: the packages it comes with
(bench/gpu_machine_packages.txt) and the wheels that travel to it (bench/gpu_wheels.txt)."""

import json
import os
import subprocess
import sys

from helpers import REPO

# Made the first thing the smoke run does: any import of a distribution outside the two lists fails as on the GPU
# machine (optional imports, e.g. timm's of wandb, then take their fallback as they would there).
BLOCKER = """
import importlib.abc, importlib.metadata, pathlib, re, runpy, sys

def names(file):
    lines = pathlib.Path(file).read_text().splitlines()
    return {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() for line in lines if line and not line.startswith("#")}

allowed = names("bench/gpu_machine_packages.txt") | names("bench/gpu_wheels.txt") | {"dinorankclip"}
owners = importlib.metadata.packages_distributions()

class Lacking(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(top, ())}
        if top not in sys.stdlib_module_names and dists and not dists & allowed:
            raise ModuleNotFoundError(f"No module named {name!r} on the GPU machine", name=name)
        return None

sys.meta_path.insert(0, Lacking())
sys.argv = ["bench/gpu_suite.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_suite.py", run_name="__main__")
"""


def positive(record: dict, *keys: str) -> bool:
    return all(isinstance(record[k], int | float) and record[k] > 0 for k in keys)


def test_the_smoke_run_measures_every_item_with_only_the_gpu_machines_packages(tmp_path):
    done = subprocess.run([sys.executable, "-c", BLOCKER, "--smoke", "--budget", "900", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["finished"] and report["smoke"] and report["errors"] == [] and report["skipped"] == []
    assert {"torch", "open_clip_torch", "timm", "device"} <= report["environment"].keys()
    assert all(r["ok"] for r in report["sync_check"].values()) and report["sync_check"].keys() == {
        "drc-r3", "tips-style", "alip"}
    runs = {"clip", "rankclip", "drc-r3", "drc-r3-fusion-v1"}
    assert report["step_eager"]["4"].keys() == runs | {"open_clip"}
    assert report["global_batch"]["4"].keys() == runs
    for table in ("step_eager", "global_batch"):
        for record in report[table]["4"].values():
            assert positive(record, "samples_per_s", "step_ms", "step_flops", "mfu")
    # ranking 16 candidates instead of 4 is more work than clip's: the emulated gather is in effect
    assert report["global_batch"]["4"]["drc-r3"]["step_flops"] > report["step_eager"]["4"]["drc-r3"]["step_flops"]
    assert all(positive(r, "ms", "flops") and r["candidates"] == 16 for r in report["losses_global"].values())
    assert positive(report["teacher"], "forward_images_per_s", "decode_images_per_s", "decode_forward_images_per_s")
    assert report["step_compiled"]["4"].keys() == {"clip", "open_clip"}
    summary = report["summary"]
    assert positive(summary["clip_over_open_clip"], "step_eager @ 4", "step_compiled @ 4")
    assert summary["overhead_over_clip_at_global_batch"].keys() == runs - {"clip"}
    assert summary["projection"]["total_hours"] > 0
    assert not {"mlflow", "dvc", "snakemake"} & set(report["imports"])
