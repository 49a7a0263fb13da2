#!/usr/bin/env bash
# Install the Debian/Ubuntu packages the single-node SLURM cluster of slurm/start.sh needs:
#   munge                         authentication between the SLURM daemons and commands
#   slurmctld slurmd slurm-client the controller, the node daemon, sbatch/squeue/scontrol/sacct/...
#   slurmdbd mariadb-server       accounting, so that `sacct` works (submitit polls it to see jobs that ended
#                                 without a result, e.g. killed at their time limit)
# Idempotent: does nothing when everything is there. Needs root (or sudo) and apt-get.
#
#   bash slurm/install.sh
#   TOKENBENCH_SLURM_ACCOUNTING=0 bash slurm/install.sh    # without slurmdbd/MariaDB (no sacct)
set -euo pipefail

need=()
want() { command -v "$1" >/dev/null 2>&1 || need+=("$2"); }
want munged munge
want slurmctld slurmctld
want slurmd slurmd
want sbatch slurm-client
if [ "${TOKENBENCH_SLURM_ACCOUNTING:-1}" = 1 ]; then
    want slurmdbd slurmdbd
    want mariadbd mariadb-server
fi
if [ ${#need[@]} -eq 0 ]; then
    echo "slurm/install.sh: everything is installed ($(slurmd -V 2>/dev/null || echo slurm))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 ||
        { echo "slurm/install.sh: need root or sudo to install ${need[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
command -v apt-get >/dev/null 2>&1 || {
    echo "slurm/install.sh: no apt-get here; install ${need[*]} with your package manager" >&2; exit 1; }

echo "slurm/install.sh: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# A fresh image has no package index; refresh it (quietly).
$SUDO apt-get update -qq
# The packages' scripts may try to start their services (containers block that with policy-rc.d, systemd
# may not run at all): harmless, start.sh starts the daemons itself with its own configuration.
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "slurm/install.sh: installed ($(slurmd -V))"
