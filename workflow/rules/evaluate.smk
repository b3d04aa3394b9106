rule evaluate:
    """Every suite of the study for one (run, seed) (pretrained or fine-tuned), through clip-benchmark: one JSON per
    benchmark, plus the linear probes and the modality-gap analysis (which runs the frozen teacher on the gap set's
    images)."""
    input:
        rules.source.output,
        rules.teacher_weights.output,
        lambda w: out(model_stage(config, w.run), w.run, w.seed),
    output:
        directory(out("evaluate", "{run}", "{seed}")),
    params:
        cli=CLI,
        settings=lambda w: settings("evaluate", "teacher", run=w.run, seed=w.seed),
    threads: cpus(EVALUATE["threads"], EVALUATE["workers"])
    resources:
        cpus_per_task=cpus(EVALUATE["threads"], EVALUATE["workers"]),
    log:
        log_file("evaluate", "{run}", "{seed}"),
    benchmark:
        benchmark_file("evaluate", "{run}", "{seed}")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} evaluate --run {wildcards.run} --seed {wildcards.seed} > {log} 2>&1"
