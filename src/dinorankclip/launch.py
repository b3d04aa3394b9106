"""How a pretraining job is started: one process, torchrun on one node, or `srun torchrun` across nodes.

The workflow builds the job's command and its SLURM resources from the study's `pretrain` section
(`gpus_per_node`, `nodes`). One node with G GPUs is one SLURM task in which torchrun forks G workers (the jobstep
wraps it in `srun -n1`); K nodes are K tasks (`mpi: srun`, so the jobstep adds no srun of its own), each
running torchrun with G workers (1 on CPU) that meet at the first node of the allocation (tested on a two-node
cluster: tests/test_preflight_multinode.py).
"""

from __future__ import annotations

RENDEZVOUS_PORT = 29500
# Host memory per training rank: the rank itself and its `workers` loader processes with their prefetched batches.
# 60 GB per rank is what the paper's 8-GPU job asked for before (480 GB); a ViT-B-16 rank measured 5-7 GB on CPU
# at batch 2 (issue 19), so this leaves the loaders room at batch 128. A site overrides it with the workflow
# profile's `set-resources: pretrain: mem_mb`.
MEM_MB_PER_RANK = 60_000


def training_command(pretrain: dict, study: str, env: str = "") -> str:
    """The command that runs `dinorankclip --study <study> ...` with the study's processes (arguments follow)."""
    gpus, nodes = pretrain["gpus_per_node"], pretrain["nodes"]
    module = f"-m dinorankclip --study {study}"
    # after `--`, torchrun passes every argument to the module untouched: without it, its parser reads the stage's
    # `--run` as an ambiguous abbreviation of its own `--run-path` and stops
    launched = f"-m dinorankclip -- --study {study}"
    prefix = f"{env} " if env else ""
    if nodes > 1:
        # In the job's shell the jobstep plugin has cleared every SLURM_* variable but the job's ids, node list and
        # step sizes included: srun is told the layout, and each task reads the first node from its own step's
        # environment (the quoted script runs there, with the stage's arguments as "$@").
        head = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
        launch = (f"exec torchrun --nnodes={nodes} --nproc_per_node={max(gpus, 1)} --rdzv_backend=c10d "
                  f"--rdzv_id=$SLURM_JOB_ID --rdzv_endpoint={head}:{RENDEZVOUS_PORT} {launched}")
        return f"""{prefix}srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 bash -c '{launch} "$@"' torchrun"""
    if gpus > 1:
        return f"{prefix}torchrun --standalone --nproc_per_node={gpus} {launched}"
    return f"{prefix}python {module}"


def training_resources(pretrain: dict) -> dict:
    """The SLURM resources of a pretraining job: `gpu` on one node, per-node `gres` and one task per node across
    nodes. `tasks_per_gpu: 0` keeps the executor plugin from turning the job into one task per GPU. On one node
    there is no `mpi` key at all: the jobstep plugin starts any job that has one (even empty) in the batch shell
    instead of `srun -n1`, where SLURM's warning signals (`--signal=TERM@300`, `scancel --signal`) never arrive."""
    gpus, nodes = pretrain["gpus_per_node"], pretrain["nodes"]
    if nodes > 1:
        return {"gpu": 0, "nodes": nodes, "tasks": nodes, "tasks_per_gpu": 0, "gres": f"gpu:{gpus}" if gpus else "",
                "mpi": "srun"}
    return {"gpu": gpus, "nodes": 1, "tasks": 1, "tasks_per_gpu": 0}


def training_host(pretrain: dict) -> dict:
    """What a pretraining job needs of each node besides GPUs: one CPU per torch thread and per loader process of
    each of its ranks (`threads` and `workers` are per rank), and MEM_MB_PER_RANK per rank."""
    ranks = max(pretrain["gpus_per_node"], 1)
    return {"cpus_per_task": ranks * (pretrain["threads"] + pretrain["workers"]), "mem_mb": ranks * MEM_MB_PER_RANK}
