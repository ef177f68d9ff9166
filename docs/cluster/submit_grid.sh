#!/usr/bin/env bash
# Submit a qlab grid to SLURM: one array task per cell (matrix_cell.sbatch), then a merge
# and report job that runs once every task has ended (afterany: a failed cell is reported
# missing, not silently dropped — rerun the array to fill it in).
#   SPEC=qlab/resources/matrix/full_8xh100.toml OUT=/shared/runs/matrix bash submit_grid.sh
set -euo pipefail
: "${SPEC:?set SPEC}" "${OUT:?set OUT}"
here=$(cd "$(dirname "$0")" && pwd)
n=$(qlab matrix list "$SPEC" --count)
array=$(sbatch --parsable --array="0-$((n - 1))" --export="ALL,SPEC=$SPEC,OUT=$OUT" "$here/matrix_cell.sbatch")
merge=$(sbatch --parsable --dependency="afterany:${array%%;*}" --job-name=qlab-merge --time=00:30:00 \
    --wrap "qlab matrix merge '$OUT' && qlab matrix report '$OUT' --figures '$OUT/figures'")
echo "cells: job $array ($n tasks); merge: job $merge"
