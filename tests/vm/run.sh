#!/usr/bin/env bash
# `make vm-test`: the VM tier (see tests/vm/runner.py and docs/guest-image.md).
# Exit status: 0 passed, 1 failed, 3 not run (no registries or host tools: never a pass).
set -uo pipefail
cd "$(dirname "$0")/../.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" -m tests.vm.runner "$@"
