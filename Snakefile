# The VCLR reproduction suite. Wiring only: every rule comes from the experiment matrix
# (vclr/matrix.py), the same job list that writes dvc.yaml, and runs one `vclr ...` command.
#   snakemake --cores 2 all_tables                                  # tiny profile (default)
#   snakemake --cores 8 all_tables --configfile config/paper.yaml   # the paper
import os

from vclr.config import load_config
from vclr.matrix import expand_jobs, final_targets

# The profile is the last --configfile given, else the tiny default. It is loaded and validated
# by our own loader (not merged into Snakemake's `config`), so a paper run never inherits tiny keys.
# Snakemake hands over --configfile as an absolute path: relative to the working directory, where
# the commands run, it is the path the DVC stages carry too (it goes into every metrics record).
CONFIG_FILE = os.path.relpath((workflow.overwrite_configfiles or ["config/config.yaml"])[-1])
PROFILE = load_config(CONFIG_FILE)
JOBS = expand_jobs(PROFILE, CONFIG_FILE)


rule all_tables:
    input:
        final_targets(JOBS),


include: "workflow/rules/jobs.smk"
