#!/usr/bin/env bash
# Run a sweep of run_sd3.sh one run after another (spec §1.2): every sampler x loss x reweight for one
# profile and reward. Arguments are passed to every run, e.g. `--num-processes 1`, `--tiny` or
# `-- --config.num_epochs=10`.
#
#   PROFILE=lowsnr2 REWARD=geneval LOSS_TYPES=matching REWEIGHTS="base fairclip2" SAMPLERS=branch \
#     bash scripts/single_node/run_all.sh --num-processes 4
#
# Environment (defaults): PROFILE (base), REWARD (pickscore), LOSS_TYPES ("ppo matching"),
# REWEIGHTS ("base guard pcpo"), SAMPLERS ("default branch"), DRY_RUN (0; 1 adds --dry-run to every run).
# Stops at the first run that fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
profile="${PROFILE:-base}"
reward="${REWARD:-pickscore}"
read -r -a losses <<< "${LOSS_TYPES:-ppo matching}"
read -r -a reweights <<< "${REWEIGHTS:-base guard pcpo}"
read -r -a samplers <<< "${SAMPLERS:-default branch}"
extra=()
[[ "${DRY_RUN:-0}" == 1 ]] && extra+=(--dry-run)

total=$(( ${#samplers[@]} * ${#losses[@]} * ${#reweights[@]} ))
run=0
for sampler in "${samplers[@]}"; do
  for loss in "${losses[@]}"; do
    for reweight in "${reweights[@]}"; do
      run=$((run + 1))
      echo "[${run}/${total}] profile=${profile} sampler=${sampler} reward=${reward} loss=${loss} reweight=${reweight}"
      bash "$here/run_sd3.sh" --profile "$profile" --sampler "$sampler" --reward "$reward" --loss "$loss" \
        --reweight "$reweight" ${extra[@]+"${extra[@]}"} "$@"
    done
  done
done
echo "Completed all ${total} runs."
