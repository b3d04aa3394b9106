rule evaluate:
    """Every suite of the study for one run (pretrained or fine-tuned), through clip-benchmark: one JSON per benchmark,
    plus the linear probes and the modality-gap analysis (which runs the frozen teacher on the gap set's images)."""
    input:
        rules.source.output,
        rules.teacher_weights.output,
        lambda w: out(model_stage(config, w.run), w.run),
    output:
        directory(out("evaluate", "{run}")),
    params:
        cli=CLI,
        settings=lambda w: settings("evaluate", "teacher", run=w.run),
    threads: config["studies"][STUDY]["evaluate"]["threads"]
    log:
        log_file("evaluate", "{run}"),
    benchmark:
        benchmark_file("evaluate", "{run}")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} evaluate --run {wildcards.run} > {log} 2>&1"
