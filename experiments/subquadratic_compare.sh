#!/usr/bin/env bash
# The subquadratic comparison of issue 16 at the subquadratic_cpu budget: one sweep folder per student, so each
# student resumes on its own and the best three later get seeds 2 and 3 in the same folder (seed=1 is skipped
# there: its results.json holds the same overrides). One thread per job; the stage-1 activations (cache=disk) and
# the stage-3 sampled targets are built once and shared through paths.cache_dir.
#   bash experiments/subquadratic_compare.sh [student ...]        # default: every student below, seed 1
#   SEEDS=1,2,3 bash experiments/subquadratic_compare.sh gla gated_deltanet
#   python experiments/subquadratic_table.py experiments/runs/subquadratic_compare_v2/*
set -euo pipefail
SEEDS=${SEEDS:-1}
ROOT=experiments/runs/subquadratic_compare_v2
students=("$@")
if [ ${#students[@]} -eq 0 ]; then
  students=(gated_deltanet retnet lolcats_window64 transformer deltanet mlstm mamba2 metala linear_attention gla)
fi
for name in "${students[@]}"; do
  case $name in
    transformer) spec=(student=transformer) ;;
    lolcats_window64) spec=(student=subquadratic/linear_attention student.window=64 task.stages.attention_transfer.cache=disk) ;;
    *) spec=(student=subquadratic/$name task.stages.attention_transfer.cache=disk) ;;
  esac
  echo "== $name (seeds $SEEDS) $(date -u +%FT%TZ)"
  /usr/bin/time -f "$name: %e s wall, %M KiB max RSS" \
    python -m opdf_exp -m +experiment=subquadratic_cpu "${spec[@]}" task.num_threads=1 seed=$SEEDS \
      hydra.sweep.dir=$ROOT/$name
done
