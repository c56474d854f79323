#!/usr/bin/env bash
# Issue 19's study: the stage-3 objective of the subquadratic_cpu recipe (the best student of the comparison so
# far, Gated DeltaNet: STUDENT=gla etc. to change it; packaged SmolLM2-135M teacher) at the same budget (100 stage-3 steps of 4 x 128 tokens, LoRA + mixers), 3 seeds, paired by seed.
# Stage 3 runs the teacher every step (teacher_cache=null: the sampled-logit cache estimates forward KL only, so
# every arm pays the same teacher forward). Stages 1 and 2 do not depend on the objective: with
# task.stages.reuse=true the first arm of each seed stores them and the other arms start from that student
# (exactly: runner/stage_reuse.py), so a seed costs one prefix and four stage 3s. One thread per job.
#   bash experiments/lm_objectives.sh                 # SEEDS="2 3" for some seeds
#   CONTROL=ce0 bash experiments/lm_objectives.sh     # the no-CE control of the forward-KL and JSD arms
#   python -m opdf_exp.report experiments/runs/lm_objectives/gated_deltanet
set -euo pipefail
STUDENT=${STUDENT:-gated_deltanet}
ROOT=experiments/runs/lm_objectives/$STUDENT
# student.rope=false: the study ran before RoPE became a candidate default for GLA, RetNet and Gated DeltaNet
# (results/rope_screen.md); pinned, so a relaunch reproduces it whatever the default (the finished jobs, made with
# the default spelled implicitly, are the same config and are kept).
COMMON=(+experiment=subquadratic_cpu student=subquadratic/$STUDENT student.rope=false
        task.stages.attention_transfer.cache=disk task.stages.end_to_end.teacher_cache=null task.stages.reuse=true
        task.num_threads=1)
SEEDS=${SEEDS:-1 2 3}
run() {  # folder, overrides...
  local name=$1; shift
  echo "== $name $(date -u +%FT%TZ)"
  ${DRY:+echo} /usr/bin/time -f "$name: %e s wall, %M KiB max RSS" \
    python -m opdf_exp -m "${COMMON[@]}" "$@" hydra.sweep.dir="$ROOT/$name"
}
# One seed at a time, all four arms, so a study stopped part-way leaves whole seeds to pair. Within a seed the
# first arm stores stages 1-2 and the next arms reuse them.
# CONTROL=ce0: the same seeds' forward-KL and JSD(0.5) arms without the CE term (task.stages.end_to_end.ce_weight=0),
# to test whether the CE term explains why perplexity and KL rank the objectives differently (their stages 1-2
# come from the stored prefix of the main arms).
if [ "${CONTROL:-}" = ce0 ]; then
  for seed in $SEEDS; do
    run "seed$seed/ce0" seed=$seed task.stages.end_to_end.divergence=forward_kl,jsd task.stages.end_to_end.beta=0.5 \
      task.stages.end_to_end.ce_weight=0
  done
  exit 0
fi
for seed in $SEEDS; do
  run "seed$seed/offline" seed=$seed task.stages.end_to_end.divergence=forward_kl,reverse_kl,jsd \
    task.stages.end_to_end.beta=0.5
  run "seed$seed/on_policy" seed=$seed task.stages.end_to_end.on_policy=0.5
done
