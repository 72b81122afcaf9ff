# The two commands of the README. Each installs what it needs first (pinned, idempotent: a
# second run installs nothing), then runs.
PYTHON ?= python3
CORES ?= 2
PROFILE ?= config/config.yaml

.PHONY: install all_tables test dvc-yaml

install:
	$(PYTHON) -m pip install --quiet -e '.[test]'
	command -v pyenv >/dev/null 2>&1 && pyenv rehash || true

# The main job of the active profile (tiny by default): data -> ... -> paper_tables/.
all_tables: install
	$(PYTHON) -m snakemake all_tables --cores $(CORES) --configfile $(PROFILE)

test: install
	$(PYTHON) -m pytest -q

# Regenerate the DVC pipelines from the experiment matrix (a test fails when they are stale).
dvc-yaml:
	$(PYTHON) -m vclr pipeline dvc --config config/config.yaml --out dvc.yaml
	$(PYTHON) -m vclr pipeline dvc --config config/paper.yaml --out pipelines/paper/dvc.yaml
