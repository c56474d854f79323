#!/usr/bin/env bash
# Run a long study from a frozen copy of the current commit, so editing this checkout cannot break it.
#
# Why: a sweep imports parts of the package lazily (the teacher cache, the stage store, a method's module) hours
# after it started. Edit the package meanwhile and such an import reads the new file against modules loaded from
# the old ones: an RTE job of the GLUE study died that way (ImportError: cannot import name 'json_digest'), and
# the jobs after it in the same worker with it. Here the study imports only the frozen copy.
#
#   bash scripts/frozen_run.sh <name> <command ...>
#   bash scripts/frozen_run.sh glue bash experiments/glue_cpu_study.sh rte cola
#   nohup bash scripts/frozen_run.sh subq bash experiments/subquadratic_compare.sh hybrids > /tmp/subq.log 2>&1 &
#
# The copy is a git worktree of HEAD (uncommitted changes are not in it) at .frozen/<name>, made afresh when HEAD
# moved. Its experiments/runs is a link to this checkout's, so results land where `git add` finds them;
# .frozen/shared links ../shared, so the copy finds the data where the checkout does; OPDF_CACHE_DIR points at
# this checkout's cache, so fine-tuned teachers and activation caches are shared.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bash scripts/frozen_run.sh <name> <command ...>" >&2; exit 2; }
name=$1; shift
repo=$(git rev-parse --show-toplevel)
frozen=$repo/.frozen/$name
head=$(git -C "$repo" rev-parse HEAD)
if [ -d "$frozen" ] && [ "$(git -C "$frozen" rev-parse HEAD 2>/dev/null)" != "$head" ]; then
  for proc in /proc/[0-9]*; do  # a study still running from the old copy keeps it
    case $(readlink "$proc/cwd" 2>/dev/null) in "$frozen" | "$frozen"/*)  # not .frozen/<name>2
      echo "a study still runs from $frozen (pid ${proc#/proc/}); give this one another name" >&2; exit 2 ;; esac
  done
  git -C "$repo" worktree remove --force "$frozen"
fi
if [ ! -d "$frozen" ]; then
  git -C "$repo" worktree add --quiet --detach "$frozen" "$head"
  rm -rf "$frozen/experiments/runs"
  ln -s "$repo/experiments/runs" "$frozen/experiments/runs"
fi
# ../shared (the real GLUE files, relative in the study scripts: GLUE_DIR=../shared/data/glue) beside the copy too
if [ -e "$repo/../shared" ] && [ ! -e "$repo/.frozen/shared" ]; then
  ln -s "$(cd "$repo/../shared" && pwd)" "$repo/.frozen/shared"
fi
echo "frozen run '$name' at $(git -C "$frozen" log --oneline -1) in $frozen"
cd "$frozen"
export PYTHONPATH=$frozen${PYTHONPATH:+:$PYTHONPATH}
export OPDF_CACHE_DIR=${OPDF_CACHE_DIR:-$repo/.cache/opdf_exp}
[ -x "$repo/.venv/bin/python" ] && export PATH=$repo/.venv/bin:$PATH
exec "$@"
