#!/usr/bin/env bash
# Stop the single-node cluster that slurm/start.sh started (jobs, slurmd, slurmctld, slurmdbd, MariaDB,
# and its munged) and delete its state, spool, database and logs.
#
#   bash slurm/stop.sh                     # TOKENBENCH_SLURM_DIR as for start.sh
#   TOKENBENCH_SLURM_KEEP=1 bash slurm/stop.sh   # stop, but keep the directory (logs, database)
set -uo pipefail

D="$(realpath -m "${TOKENBENCH_SLURM_DIR:-/tmp/tokenbench-slurm}")"
CONF="$D/etc/slurm.conf"
export SLURM_CONF="$CONF"
say() { echo "slurm/stop.sh: $*"; }
# One start/stop at a time (test sessions may race to start the same cluster).
exec 9>"${D%/}.lock"
flock -w 120 9 || { echo "${0##*/}: another start/stop holds ${D%/}.lock" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {  # stop NAME PIDFILE: SIGTERM, wait up to 20 s, then SIGKILL
    local name=$1 pidfile=$2 pid
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || { say "$name stopped"; return 0; }
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null; say "$name killed"
}

if [ ! -d "$D" ]; then say "nothing to stop ($D does not exist)"; exit 0; fi

# Jobs first, while slurmctld and slurmd can still end them (their steps outlive slurmd otherwise).
if alive "$D/run/slurmctld.pid" && alive "$D/run/slurmd.pid"; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// }" ]; then
        say "cancelling jobs $jobs"
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs 2>/dev/null
        for _ in $(seq 1 150); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    fi
fi
stop slurmd "$D/run/slurmd.pid"
stop slurmctld "$D/run/slurmctld.pid"
stop slurmdbd "$D/run/slurmdbd.pid"
stop mariadbd "$D/run/mysqld/mariadbd.pid"
stop munged "$D/run/munge/munged.pid"   # this cluster's own (socket in $D/run/munge)

if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ]; then rm -f /etc/slurm/slurm.conf; fi
if [ "${TOKENBENCH_SLURM_KEEP:-0}" = 1 ]; then
    say "kept $D"
else
    rm -rf "$D"
    say "removed $D"
fi
