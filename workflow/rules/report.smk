rule report:
    """Tables (CSV, markdown, LaTeX) and figures (PNG, PDF) of every run on every benchmark, aggregated over its
    seeds, the matched-compute column from the training metrics."""
    input:
        expand(rules.evaluate.output, zip, **pairs(EVALUATED)),
        expand(rules.pretrain.output, zip, **pairs(RUNS)),
        expand(rules.finetune.output, zip, **pairs(list(FINETUNED))),
    output:
        report(
            directory(out("report")),
            patterns=["{name}.html", "{name}.png"],
            category="Tables and figures",
            labels={"result": "{name}"},
            caption="../report/results.rst",
        ),
    params:
        cli=CLI,
        settings=lambda w: settings("evaluate"),
        runs=EVALUATED,
        finetuned=FINETUNED,
        tables=config["report"],
    log:
        log_file("report"),
    benchmark:
        benchmark_file("report")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} report > {log} 2>&1"
