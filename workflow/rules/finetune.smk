rule finetune:
    """KUEA: one fine-tuned (run, seed)'s image tower aligned to the teacher's CLS kernel; text tower frozen; exported.
    It starts from the same seed of its start run."""
    input:
        lambda w: [out(stage) for stage in finetune_stages(resolve(config, STUDY, w.run))],
        lambda w: out("pretrain", FINETUNED[w.run], w.seed),
    output:
        directory(out("finetune", "{run}", "{seed}")),
    params:
        cli=CLI,
        settings=lambda w: settings("finetune", "teacher", "model", "injection", run=w.run, seed=w.seed),
    threads: cpus(FINETUNE["threads"], FINETUNE["workers"])
    priority: FINETUNE_CHAIN
    resources:
        cpus_per_task=cpus(FINETUNE["threads"], FINETUNE["workers"]),
    log:
        log_file("finetune", "{run}", "{seed}"),
    benchmark:
        benchmark_file("finetune", "{run}", "{seed}")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} finetune --run {wildcards.run} --seed {wildcards.seed} > {log} 2>&1"
