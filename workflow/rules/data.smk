rule source:
    """The caption list: generate the demo world, or fetch the CC3M TSV (a local rule: it may need the network)."""
    output:
        directory(out("source")),
    params:
        cli=CLI,
        settings=lambda w: settings("source"),
    log:
        log_file("source"),
    benchmark:
        benchmark_file("source")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} source > {log} 2>&1"


rule data:
    """img2dataset: caption list -> webdataset shards and download stats (local: compute nodes may be offline)."""
    input:
        rules.source.output,
    output:
        directory(out("data")),
    params:
        cli=CLI,
        settings=lambda w: settings("source", "data"),
    threads: cpus(config["studies"][STUDY]["data"]["processes"])
    resources:
        cpus_per_task=cpus(config["studies"][STUDY]["data"]["processes"]),
    log:
        log_file("data"),
    benchmark:
        benchmark_file("data")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} data > {log} 2>&1"
