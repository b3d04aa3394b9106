rule pretrain:
    """One (run, seed) of the study: open_clip towers trained on the shards; exported as an open_clip local-dir."""
    input:
        rules.data.output,
        lambda w: [out(stage) for stage in pretrain_stages(resolve(config, STUDY, w.run))],
    output:
        directory(out("pretrain", "{run}", "{seed}")),
    params:
        cli=training_command(TRAINING, STUDY, PACKAGE),
        settings=lambda w: settings("loss", "injection", "captions", "patch_loss", "teacher", "model", "pretrain",
                                    run=w.run, seed=w.seed),
    threads: TRAINING_HOST["cpus_per_task"]
    priority: lambda w: FINETUNE_CHAIN if w.run in FINETUNED.values() else 0
    resources:
        **TRAINING_RESOURCES,
        **TRAINING_HOST,
    log:
        log_file("pretrain", "{run}", "{seed}"),
    benchmark:
        benchmark_file("pretrain", "{run}", "{seed}")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} pretrain --run {wildcards.run} --seed {wildcards.seed} > {log} 2>&1"
