rule teacher:
    """Frozen DINOv3 features (CLS + pooled patch maps) for every training image, keyed like the images."""
    input:
        rules.data.output,
    output:
        directory(out("teacher")),
    params:
        cli=CLI,
        settings=lambda w: settings("teacher", "model"),
    threads: config["studies"][STUDY]["teacher"]["threads"]
    log:
        log_file("teacher"),
    benchmark:
        benchmark_file("teacher")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} teacher > {log} 2>&1"
