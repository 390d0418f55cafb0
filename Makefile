# The two commands of a fresh machine: `make run` (main job) and `make test` (the test suite).
# Both install what they need first. torch is installed only when missing, so a CUDA build a user
# already has is never replaced; TORCH_SPEC picks what a machine without torch gets.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -m "not slow"

.PHONY: install run test

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

run: install
	vggt-fsdp train recipes/cpu_tiny.yaml

# Two pytest processes side by side, one core each (tests/run_suite.py); `python -m pytest` runs the
# same tests in one process.
test: install
	$(PYTHON) tests/run_suite.py $(PYTEST_ARGS)
