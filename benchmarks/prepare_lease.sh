#!/usr/bin/env bash
# Prepares a GPU lease, on the development machine (which has network): the reference
# package symile 0.1.0, pure Python (needs only torch and numpy, both on the GPU machine),
# as a wheel in .whl/ (ignored by git), for the device call to carry and install offline,
# and the git revision of this checkout in .whl/git-revision.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: -d .whl symile==0.1.0
# The device gets a copy of the working tree without .git: the suite reads the revision here.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!.whl' || echo '-dirty')" > .whl/git-revision.txt
ls -l .whl
