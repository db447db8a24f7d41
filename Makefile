# streamer: `make demo` runs the whole product on a local broker; `make test` runs every test.
# Both install what they need into a virtualenv kept outside the clone (torch is several GB),
# reused by later runs and other clones; set VENV to put it elsewhere.

PYTHON ?= python3
VENV ?= $(HOME)/.cache/streamer/venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.streamer-$(shell cat pyproject.toml | sha1sum | cut -c1-12)-$(shell echo $(CURDIR) | sha1sum | cut -c1-8)
PYTEST_ARGS ?=

.PHONY: install test test-unit test-kafka demo bench bench-scale bench-gpu nab kafka-start kafka-stop clean-venv deploy-tools

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.streamer-*
	@touch $@

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -m "not kafka" $(PYTEST_ARGS)

test-kafka: install
	$(BIN)/python -m pytest -m kafka $(PYTEST_ARGS)

demo: install
	$(BIN)/python deploy/demo.py

bench: install
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/engine_vs.py
	$(BIN)/python bench/codecs.py
	$(BIN)/python bench/kafka_clients.py
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/batch_messages.py
	$(BIN)/python bench/history_csv.py

# A table of 10M devices on this host (about 6 GiB at the defaults; see bench/scale.py).
bench-scale: install
	$(BIN)/python bench/scale.py

# The fused GPU step against nn.LSTM and cuDNN, then the equivalence tests on CUDA. It needs
# torch and numpy alone: with the project's venv where there is one, else the machine's python
# (a GPU machine's image has torch, and may have nothing else nor an index to install from).
bench-gpu:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) bench/gpu_check.py

# The NAB series in ../shared/data/nab (or NAB_DATA) through the replay engine, scored by NAB's method.
NAB_DATA ?= $(CURDIR)/../shared/data/nab
nab: install
	$(BIN)/python bench/nab.py --data $(NAB_DATA)

# prometheus and promtool (Debian's package) for tests/test_deploy.py and the observability test,
# which skip without them; as root on Debian or Ubuntu.
deploy-tools:
	@command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus)

kafka-start:
	deploy/kafka/local-kafka start

kafka-stop:
	deploy/kafka/local-kafka stop

clean-venv:
	rm -rf $(VENV)
