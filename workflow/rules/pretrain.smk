rule pretrain:
    """One run of the registry: open_clip towers trained on the shards; exported as an open_clip local-dir."""
    input:
        rules.data.output,
        lambda w: [out(stage) for stage in pretrain_stages(resolve(config, STUDY, w.run))],
    output:
        directory(out("pretrain", "{run}")),
    params:
        cli=training_command(TRAINING, STUDY, PACKAGE),
        settings=lambda w: settings("loss", "injection", "captions", "patch_loss", "teacher", "model", "pretrain",
                                    run=w.run),
    threads: TRAINING["threads"]
    resources:
        **TRAINING_RESOURCES,
    log:
        log_file("pretrain", "{run}"),
    benchmark:
        benchmark_file("pretrain", "{run}")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} pretrain --run {wildcards.run} > {log} 2>&1"
