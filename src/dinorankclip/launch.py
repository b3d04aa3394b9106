"""How a pretraining job is started: one process, torchrun on one node, or `srun torchrun` across nodes.

The workflow builds the job's command and its SLURM resources from the study's `pretrain` section
(`gpus_per_node`, `nodes`). One node with G GPUs is one SLURM task in which torchrun forks G workers (the jobstep
wraps it in `srun -n1`); K nodes are K tasks (`mpi: srun`, so the jobstep adds no srun of its own), each
running torchrun with G workers that meet at the first node of the allocation.
"""

from __future__ import annotations

RENDEZVOUS_PORT = 29500


def training_command(pretrain: dict, study: str, env: str = "") -> str:
    """The command that runs `dinorankclip --study <study> ...` with the study's processes (arguments follow)."""
    gpus, nodes = pretrain["gpus_per_node"], pretrain["nodes"]
    module = f"-m dinorankclip --study {study}"
    prefix = f"{env} " if env else ""
    if nodes > 1:
        head = "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)"
        return (f"{prefix}srun torchrun --nnodes={nodes} --nproc_per_node={gpus} --rdzv_backend=c10d "
                f"--rdzv_id=$SLURM_JOB_ID --rdzv_endpoint={head}:{RENDEZVOUS_PORT} {module}")
    if gpus > 1:
        return f"{prefix}torchrun --standalone --nproc_per_node={gpus} {module}"
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
