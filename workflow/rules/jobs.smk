# One rule per job of the experiment matrix; each is a single shell call of the `vclr` CLI.
for _job in JOBS:

    rule:
        name:
            _job.name
        input:
            list(_job.deps),
        output:
            [directory(path) for path in _job.out_dirs]
            # the tables and figures also go into `snakemake --report report.html`
            + [report(directory(path), patterns=["{name}.csv", "figures/{name}.png"],
                      caption="../report/tables.rst", category="VCLR tables and figures")
               for path in _job.committed_dirs]
            + list(_job.out_files + _job.metrics_files),
        log:
            _job.log,
        threads: _job.threads
        priority: _job.priority
        conda:
            # the pinned environment of the whole suite (used with --sdm conda)
            "../../environment.yml"
        resources:
            **_job.resources,
        params:
            cmd=_job.shell,
        shell:
            "{params.cmd} > {log} 2>&1"
