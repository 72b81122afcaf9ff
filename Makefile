# The two commands of the README. Each installs what it needs first (pinned, idempotent: a
# second run installs nothing), then runs.
PYTHON ?= python3
CORES ?= 2
PROFILE ?= config/config.yaml

.PHONY: install all_tables test dvc-yaml gpu-bench

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

# On a CUDA machine: the CUDA tests and the GPU figures of docs/benchmarks.md (input pipeline, the
# pretraining step and real loop with and without prefetching, feature extraction) as JSON files in
# $(BENCH_OUT). Needs torch, torchvision, numpy, PIL, tqdm, pytest (no PyAV, no install: PYTHONPATH=.).
BENCH_OUT ?= bench-gpu
gpu-bench:
	mkdir -p $(BENCH_OUT)
	PYTHONPATH=. $(PYTHON) -m pytest -q -p no:cacheprovider -k cuda tests/test_device_prefetch.py tests/test_batch_augment.py
	PYTHONPATH=. $(PYTHON) -m vclr bench input --device cuda --rounds 5 --out-json $(BENCH_OUT)/input.json
	PYTHONPATH=. $(PYTHON) -m vclr bench pretrain --device cuda --rounds 2 --warmup 2 --loop-mode bf16_channels_last_compile \
		--loop-augment batched --loop-prefetch 0,1 --out-json $(BENCH_OUT)/pretrain.json
	PYTHONPATH=. $(PYTHON) -m vclr bench features --device cuda --generate 256 --rounds 3 --out-json $(BENCH_OUT)/features.json
