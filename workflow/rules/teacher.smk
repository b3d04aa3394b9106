rule teacher_weights:
    """The teacher's weights: the demo trains its DINOv3-architecture stand-in; the paper imports DINOv3's file."""
    input:
        rules.source.output,
        rules.data.output,
    output:
        directory(out("teacher_weights")),
    params:
        cli=CLI,
        settings=lambda w: settings("teacher"),
    threads: cpus(config["studies"][STUDY]["teacher"]["threads"])
    resources:
        cpus_per_task=cpus(config["studies"][STUDY]["teacher"]["threads"]),
    priority: CRITICAL_PATH
    log:
        log_file("teacher_weights"),
    benchmark:
        benchmark_file("teacher_weights")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} teacher-weights > {log} 2>&1"


rule teacher:
    """Frozen DINOv3 features (CLS + pooled patch maps) for every training image, keyed like the images."""
    input:
        rules.data.output,
        rules.teacher_weights.output,
    output:
        directory(out("teacher")),
    params:
        cli=CLI,
        settings=lambda w: settings("teacher", "model"),
    threads: cpus(config["studies"][STUDY]["teacher"]["threads"])
    resources:
        cpus_per_task=cpus(config["studies"][STUDY]["teacher"]["threads"]),
    priority: CRITICAL_PATH
    log:
        log_file("teacher"),
    benchmark:
        benchmark_file("teacher")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} teacher > {log} 2>&1"
