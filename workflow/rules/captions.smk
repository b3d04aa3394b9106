rule captions:
    """A second caption per training image (synthetic, or the demo's complete descriptions), joined to the shards
    by key: read by ALIP and by TIPSv2-style caption sampling. The caption file is a parameter, not an input, so a
    dry run of the paper study needs nothing on disk (the demo's file is inside the source stage's output)."""
    input:
        rules.source.output,
        rules.data.output,
    output:
        directory(out("captions")),
    params:
        cli=CLI,
        settings=lambda w: settings("captions"),
    threads: cpus(1)
    resources:
        cpus_per_task=cpus(1),
    log:
        log_file("captions"),
    benchmark:
        benchmark_file("captions")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} captions > {log} 2>&1"
