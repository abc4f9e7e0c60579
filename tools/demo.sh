#!/usr/bin/env bash
# The whole GroupDiff pipeline on this machine — no GPU, no cluster — on Fashion-MNIST (Debian's
# dataset-fashion-mnist): grouped shards → DeepSpeed training of a tiny group-attention SiT → group sampling →
# FID → samples.png, loss.png, metrics.json in runs/demo/. 8-10 minutes on 2 cores, install included.
# Knobs (environment): GD_DEMO_ROOT (runs), GD_DEMO_STEPS, GD_DEMO_TRAIN_IMAGES, GD_DEMO_EVAL_IMAGES,
# GD_DEMO_REF_IMAGES, GD_DEMO_SAMPLE_STEPS, GD_DEMO_BASELINE: 1 also trains and scores plain SiT at the same
# budget, 0 never, auto (default) only when the time so far leaves room for it within GD_DEMO_BUDGET_S (600).
set -euo pipefail
cd "$(dirname "$0")/.."
root=${GD_DEMO_ROOT:-runs}
steps=${GD_DEMO_STEPS:-}
train_images=${GD_DEMO_TRAIN_IMAGES:-20000}
eval_images=${GD_DEMO_EVAL_IMAGES:-}
ref_images=${GD_DEMO_REF_IMAGES:-1000}
sample_steps=${GD_DEMO_SAMPLE_STEPS:-}
baseline=${GD_DEMO_BASELINE:-auto}
budget=${GD_DEMO_BUDGET_S:-600}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
start=$(date +%s)
stages=()
mark=$start
done_stage() { local now; now=$(date +%s); stages+=("$(printf '%-34s %3d:%02d' "$1" $(( (now - mark) / 60 )) $(( (now - mark) % 60 )))"); mark=$now; }

say "1/5 install (Debian's Fashion-MNIST, .venv with the package)"
bash tools/system-deps.sh fashion-mnist
bash tools/install.sh
# shellcheck disable=SC1091
. "${GD_VENV:-.venv}/bin/activate"
export DS_ACCELERATOR=cpu PYTHONWARNINGS=ignore
done_stage "install"

say "2/5 grouped shards: Fashion-MNIST → pixel latents, Inception embeddings → neighbours (cosine ≥ τ) → MDS"
# Grouping as the method benchmark found best here: Inception pool features (fid-helper's offline network), τ 0.8,
# groups of 2.
shards="$root/shards/fashion_mnist_sim2"
python tools/build_shards.py out="$shards" work_dir="$root/build_shards/fashion_mnist_sim2" limit="$train_images" \
  embedder=inception tau=0.8 n_max=2 progress=false
ref="$root/reference/fashion_mnist_test_$ref_images.npz"
[ -f "$ref" ] || python -m gd.demo reference "$ref" --limit "$ref_images"
done_stage "shards and FID reference"

overrides=(run.root="$root" data.root="$shards")
[ -n "$steps" ] && overrides+=(train.steps="$steps")
sample=(metrics.reference="$ref" metrics.reference_max_images="$ref_images" sample.progress=false)
[ -n "$eval_images" ] && sample+=(sample.num_images="$eval_images")
[ -n "$sample_steps" ] && sample+=(sample.steps="$sample_steps")

say "3/5 train GroupDiff-l (N=2) with DeepSpeed: python -m gd.launch +cluster=local +exp=demo"
t_main=$(date +%s)
python -m gd.launch +cluster=local +exp=demo "${overrides[@]}"
done_stage "training (launch included)"

say "4/5 sample class-conditional groups and compute FID: python -m gd.evaluate"
python -m gd.evaluate +exp=demo "${overrides[@]}" "${sample[@]}" metrics.out="$root/demo/eval.json"
done_stage "sampling and FID"

report=(python -m gd.demo report "$root/demo" "$root/demo/eval.json")
now=$(date +%s)
if [ "$baseline" = auto ]; then
  # The baseline costs about what training + evaluating GroupDiff just did (reference features are cached).
  if [ $(( now - start + now - t_main )) -le "$budget" ]; then baseline=1; else
    baseline=0
    echo "(skipping the plain-SiT comparison: it would end past ${budget} s; GD_DEMO_BASELINE=1 runs it anyway)"
  fi
fi
if [ "$baseline" = 1 ]; then
  say "4b/5 the same budget without groups (plain SiT), for comparison"
  python -m gd.launch +cluster=local +exp=demo diffusion=plain run.name=demo_plain "${overrides[@]}"
  python -m gd.evaluate +exp=demo diffusion=plain run.name=demo_plain "${overrides[@]}" "${sample[@]}" \
    metrics.out="$root/demo_plain/eval.json"
  report+=(--baseline "$root/demo_plain" "$root/demo_plain/eval.json")
  done_stage "plain SiT: training, sampling, FID"
fi

say "5/5 report"
"${report[@]}"
done_stage "report"
echo "wrote $root/demo/samples.png, $root/demo/loss.png, $root/demo/metrics.json in $(( $(date +%s) - start )) s"
printf '\nstage                              time\n'
printf '%s\n' "${stages[@]}"
total=$(( $(date +%s) - start ))
printf '%-34s %3d:%02d\n' "total" $(( total / 60 )) $(( total % 60 ))
