rule finetune:
    """KUEA: one fine-tuned run's image tower aligned to the teacher's CLS kernel; text tower frozen; exported."""
    input:
        lambda w: [out(stage) for stage in finetune_stages(resolve(config, STUDY, w.run))],
        lambda w: out("pretrain", FINETUNED[w.run]),
    output:
        directory(out("finetune", "{run}")),
    params:
        cli=CLI,
        settings=lambda w: settings("finetune", "teacher", "model", "injection", run=w.run),
    threads: resolve(config, STUDY)["finetune"]["threads"]
    log:
        log_file("finetune", "{run}"),
    benchmark:
        benchmark_file("finetune", "{run}")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} finetune --run {wildcards.run} > {log} 2>&1"
