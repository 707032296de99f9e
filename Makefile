# ckpt2hf: `make convert` and `make test` are all a fresh machine needs.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
EXAMPLE_ROOT := build/example
LLAMA := build/llama.cpp
# An older stack for the tests' PEFT 0.6 run (tests/old_stack.py), ahead of the venv's packages on its PYTHONPATH.
OLD_STACK := build/old-stack
OLD_STACK_PACKAGES := peft==0.6.2 transformers==4.36.2 tokenizers==0.15.2 huggingface_hub==0.20.3
# And the tutorial LM module as pytorch_lightning 1.9 and PEFT 0.10 wrote it (setuptools: lightning_fabric 1.9's
# namespace package needs pkg_resources).
OLD_PL := build/old-stack-pl19
OLD_PL_PACKAGES := pytorch_lightning==1.9.5 peft==0.10.0 transformers==4.36.2 tokenizers==0.15.2 \
	huggingface_hub==0.20.3 "setuptools<70"
RUN ?=
OUT ?=
ARGS ?=
export TOKENIZERS_PARALLELISM := false

.PHONY: venv convert inspect test test-installed test-consumers lint format clean bench fuzz

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev]'
	touch $@

# make convert RUN=runs/<name> [OUT=dir] [ARGS="--dtype bfloat16 ..."]; without RUN: the built-in example run.
# Several runs, RUN="runs/a runs/b": each into OUT/<name>/ (OUT default: exports), a table at the end.
convert: venv
ifeq ($(strip $(RUN)),)
	@run=$$(HF_HUB_OFFLINE=1 $(PY) -m converter.example $(EXAMPLE_ROOT)) && \
	$(PY) -m converter convert "$$run" --out "$${OUT:-$$run/export}" --force $(ARGS)
else ifneq ($(words $(RUN)),1)
	$(PY) -m converter convert $(RUN) --out-root "$(if $(OUT),$(OUT),exports)" $(ARGS)
else
	$(PY) -m converter convert "$(RUN)" --out "$(if $(OUT),$(OUT),$(RUN)/export)" $(ARGS)
endif

# make inspect RUN=runs/<name> [ARGS=--json]; without RUN: the built-in example run.
inspect: venv
	@run="$(RUN)"; [ -n "$$run" ] || run=$$(HF_HUB_OFFLINE=1 $(PY) -m converter.example $(EXAMPLE_ROOT)); \
	$(PY) -m converter inspect "$$run" $(ARGS)

# The tests are offline by themselves (tests/conftest.py); the Makefile leaves the hub to the user.
test: venv lint test-installed $(LLAMA)/.prepared $(OLD_STACK)/.installed $(OLD_PL)/.installed
	$(PY) -m pytest -q -m "not consumers" $(PYTEST_ARGS)

# The sdist and the wheel built from it, installed into a fresh environment outside the checkout, convert and
# verify the example run there (about 20 s: the dependencies are the venv's, nothing is downloaded).
test-installed: venv
	$(PY) tests/installed.py

# llama.cpp's converter and vocabulary from llama-cpp-python's sdist, and the Qwen2 tokenizer (tests/consumers.py).
$(LLAMA)/.prepared: tests/consumers.py | venv
	HF_HUB_OFFLINE=1 $(PY) tests/consumers.py
	touch $@

$(OLD_STACK)/.installed: Makefile | venv
	rm -rf $(OLD_STACK)
	$(PY) -m pip install -q --no-deps --target $(OLD_STACK) $(OLD_STACK_PACKAGES)
	touch $@

$(OLD_PL)/.installed: Makefile | venv
	rm -rf $(OLD_PL)
	$(PY) -m pip install -q --no-deps --target $(OLD_PL) $(OLD_PL_PACKAGES)
	touch $@

# Not part of CI: builds llama-cpp-python (llama.cpp itself) from the same sdist -- 10 to 15 minutes on 2 cores --
# and runs the GGUF of an export with it, against transformers on the export.
test-consumers: venv $(LLAMA)/.prepared
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install $(LLAMA)/llama_cpp_python-*.tar.gz
	$(PY) -m pytest -q -m consumers tests/test_consumers.py $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check converter tests bench
	$(VENV)/bin/ruff format --check converter tests bench

format: venv
	$(VENV)/bin/ruff check --fix converter tests bench
	$(VENV)/bin/ruff format converter tests bench

# Not part of CI: builds and caches a Qwen3-0.6B-shaped run (about 20 GB of disk), then measures (BENCH_ARGS=--help).
bench: venv
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) bench/bench.py $(BENCH_ARGS)
	$(PY) bench/migration.py

# Not part of CI: seeded damage to every kind of input for MINUTES (default 30), with a fresh seed (SEED=n
# replays one); each input that breaks the property goes to fuzz-crashes/ (the damaged file and its damage).
MINUTES ?= 30
SEED ?=
fuzz: venv
	cd tests && ../$(PY) fuzzing.py --minutes $(MINUTES) --crashes ../fuzz-crashes $(if $(SEED),--seed $(SEED))

clean:
	rm -rf build .pytest_cache
