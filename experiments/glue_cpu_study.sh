#!/usr/bin/env bash
# Issue 17's five-task GLUE study (+experiment=glue_cpu), task by task, each at KD's own best rate from
# +experiment=glue_cpu_selection (experiments/results/glue_cpu.md), 5 seeds, one thread. One sweep folder per task,
# so a relaunch skips finished jobs and resumes the task in progress.
#   bash experiments/glue_cpu_study.sh [task ...]        # default: mrpc rte cola stsb sst2
#   python -m opdf_exp.report experiments/runs/glue_cpu/*
set -euo pipefail
declare -A RATE=([mrpc]=3e-4 [rte]=3e-4 [cola]=3e-4 [stsb]=1e-3 [sst2]=1e-4)
SEEDS=${SEEDS:-1,2,3,4,5}
for task in "${@:-mrpc rte cola stsb sst2}"; do
  for t in $task; do
    echo "== $t lr ${RATE[$t]} seeds $SEEDS $(date -u +%FT%TZ)"
    ${DRY:+echo} env GLUE_DIR=../shared/data/glue OMP_NUM_THREADS=1 /usr/bin/time -f "$t: %e s wall" \
      python -m opdf_exp -m +experiment=glue_cpu data=glue/$t optim.lr=${RATE[$t]} seed=$SEEDS \
        hydra/launcher=local_parallel hydra.launcher.n_jobs=1 hydra.sweep.dir=experiments/runs/glue_cpu/$t
  done
done
