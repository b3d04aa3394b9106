# The study's caption source decides the job's size: a file join is one thread; CoCa gets its threads and a GPU.
CAPTIONS = resolve(config, STUDY)["captions"]
CAPTIONER = CAPTIONS["source"] == "coca"


rule captions:
    """A second caption per training image (written by CoCa, or joined from a caption file such as the demo's
    complete descriptions), keyed like the images: read by ALIP and by TIPSv2-style caption sampling. The caption
    file and the CoCa weights are parameters, not inputs, so a dry run of the paper study needs nothing on disk (the
    demo's file is inside the source stage's output)."""
    input:
        rules.source.output,
        rules.data.output,
    output:
        directory(out("captions")),
    params:
        cli=CLI,
        settings=lambda w: settings("captions"),
    threads: cpus(CAPTIONS["coca"]["threads"], CAPTIONS["coca"]["workers"]) if CAPTIONER else cpus(1)
    resources:
        gpu=1 if CAPTIONER else 0,
        cpus_per_task=cpus(CAPTIONS["coca"]["threads"], CAPTIONS["coca"]["workers"]) if CAPTIONER else cpus(1),
    log:
        log_file("captions"),
    benchmark:
        benchmark_file("captions")
    conda:
        "../../envs/dinorankclip.yaml"
    shell:
        "{params.cli} captions > {log} 2>&1"
