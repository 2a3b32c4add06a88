# Two commands on a fresh machine: `make run` and `make test`. Everything else is here for developers.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test bench demo lint proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Demo PKI, demo models (built with onnx.helper, signed), audit log key: made only where absent.
demo: $(STAMP)
	$(BIN)/gateway demo init

# `make run CONFIG=FILE` serves that configuration instead (no demo set-up is made for it).
run: $(STAMP)
ifeq ($(CONFIG),)
	$(BIN)/gateway demo init
	$(BIN)/gateway serve
else
	$(BIN)/gateway serve --config $(CONFIG)
endif

test: demo
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q
	$(BIN)/gateway policy test policies policies/tests/*.yaml

bench: demo
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check .

# Regenerates the committed gRPC code in gateway/_proto from proto/.
proto: $(STAMP)
	rm -rf gateway/_proto && mkdir -p gateway/_proto
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=gateway/_proto --grpc_python_out=gateway/_proto \
		--pyi_out=gateway/_proto $$(find proto -name '*.proto' | sort)
	find gateway/_proto -type d -exec touch {}/__init__.py \;
	# protoc writes absolute imports rooted at proto/; make them package-relative.
	find gateway/_proto -name '*_pb2*.py' -exec sed -i -E \
		's/^from (inference|gateway\.v1) import /from gateway._proto.\1 import /' {} +

clean:
	rm -rf $(VENV) var certs/dev models .pytest_cache
