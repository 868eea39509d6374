#!/usr/bin/env bash
# Install matchrt (editable, no network) on the lent GPU machine; wheels carried in .whl/.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . -e examples/matchrt-xfeat 2>&1 | grep -v WARN || true
python3 -c "import matchrt, matchrt_xfeat; print('matchrt installed')"
