"""dinorankclip: source -> data -> teacher features -> pretraining -> KUEA fine-tuning -> evaluation -> report
(see README.md)."""

import json
import os

from dinorankclip.config import PARAMS_ENV, PARAMS_FILE, read_params_file, validate_params


# A YAML syntax error stops the workflow here naming the file, line and column (Snakemake's configfile loader
# says only that the file is not valid YAML).
read_params_file(PARAMS_FILE)


configfile: PARAMS_FILE


# A bad parameter stops the workflow here, before any job starts, with a message naming the key. A study that
# `extends` another is expanded in place, so rules and jobs see its complete block.
config.update(validate_params(config, "workflow configuration (params.yaml with --config/--configfile overrides)"))
# Jobs read the configuration the workflow validated, --config overrides included.
os.environ[PARAMS_ENV] = json.dumps(config)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/captions.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


localrules:
    all,
    source,
    report,


# The download runs for hours on the machine running Snakemake (compute nodes are often offline), unless the study
# says its cluster's compute nodes reach the web (`data.cluster_job`): then it is a cluster job like the others.
if not config["studies"][config["study"]]["data"]["cluster_job"]:

    localrules:
        data,


# The teacher and captions stages are listed because dvc.yaml makes every pretraining run depend on them (its
# templates cannot select by run): `make demo` then leaves DVC's view complete even for a study whose runs read
# neither.
rule all:
    default_target: True
    input:
        rules.teacher.output,
        rules.captions.output,
        rules.report.output,
