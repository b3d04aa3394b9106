rule report:
    """Tables (CSV, markdown, LaTeX) and figures (PNG, PDF) of every run on every benchmark, the matched-compute
    column from the training metrics."""
    input:
        expand(rules.evaluate.output, run=EVALUATED),
        expand(rules.pretrain.output, run=RUNS),
        expand(rules.finetune.output, run=FINETUNED),
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
