#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine: munged (with a socket of its own), MariaDB + slurmdbd
# (accounting, so `sacct` works and submitit can see jobs that died without a result), slurmctld and slurmd,
# with a generated slurm.conf for `hostname`. Idempotent: daemons already running are left alone; a cold start
# (none running) begins with empty state, queue and accounting. Needs root.
#
#   bash slurm/install.sh && bash slurm/start.sh      # then: export SLURM_CONF=... (printed), sinfo
#   bash slurm/stop.sh                                # stops everything and deletes the state
#
# Settings (environment variables, all optional):
#   TOKENBENCH_SLURM_DIR         state, spool, logs, generated configs    (/tmp/tokenbench-slurm)
#   TOKENBENCH_SLURM_CPUS        CPUs the node offers; more than the machine has oversubscribes it
#                                (the machine's count)
#   TOKENBENCH_SLURM_MEM_MB      memory the node offers, MB                (real memory - 512)
#   TOKENBENCH_SLURM_GPUS        fake GPUs (gres gpu, no devices) so --gpus requests schedule; 0 = none (4)
#   TOKENBENCH_SLURM_PARTITION   name of the default partition            (debug)
#   TOKENBENCH_SLURM_ACCOUNTING  1 = MariaDB + slurmdbd so sacct works; 0 = no accounting (1)
#   TOKENBENCH_SLURM_PORT        first of four TCP ports: slurmctld, slurmd, slurmdbd, MariaDB (6817)
#   TOKENBENCH_SLURM_KILLWAIT    seconds between SIGTERM and SIGKILL when a job is cancelled/requeued (5)
#   TOKENBENCH_SLURM_CRED_EXPIRE credential lifetime; a requeued job waits this long before it restarts (20)
#   TOKENBENCH_SLURM_TIMEOUT     seconds to wait for the node to become idle (90)
#   TOKENBENCH_SLURM_LINK_ETC    1 = also link /etc/slurm/slurm.conf to the generated one when that file
#                                does not exist (so commands work without SLURM_CONF) (1)
set -euo pipefail

D="$(realpath -m "${TOKENBENCH_SLURM_DIR:-/tmp/tokenbench-slurm}")"
ACCOUNTING="${TOKENBENCH_SLURM_ACCOUNTING:-1}"
PORT="${TOKENBENCH_SLURM_PORT:-6817}"
CTLD_PORT=$PORT; SLURMD_PORT=$((PORT + 1)); DBD_PORT=$((PORT + 2)); DB_PORT=$((PORT + 3))
GPUS="${TOKENBENCH_SLURM_GPUS:-4}"
PARTITION="${TOKENBENCH_SLURM_PARTITION:-debug}"
KILLWAIT="${TOKENBENCH_SLURM_KILLWAIT:-5}"
CRED_EXPIRE="${TOKENBENCH_SLURM_CRED_EXPIRE:-20}"
TIMEOUT="${TOKENBENCH_SLURM_TIMEOUT:-90}"
LINK_ETC="${TOKENBENCH_SLURM_LINK_ETC:-1}"
HOST="$(hostname -s)"
CONF="$D/etc/slurm.conf"
export SLURM_CONF="$CONF"

say() { echo "slurm/start.sh: $*"; }
# One start/stop at a time (test sessions may race to start the same cluster); daemons get 9>&-.
exec 9>"${D%/}.lock"
flock -w 120 9 || { echo "${0##*/}: another start/stop holds ${D%/}.lock" >&2; exit 1; }
die() {
    echo "slurm/start.sh: error: $*" >&2
    for f in "$D"/log/*.log; do [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }; done
    exit 1
}
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }   # alive PIDFILE
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 what=$2; shift 2
    for _ in $(seq 1 $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "timed out after ${t}s waiting for $what"
}

[ "$(id -u)" -eq 0 ] || die "run as root (slurmd must run as root to start jobs)"
for b in munged slurmctld slurmd sinfo; do
    command -v $b >/dev/null 2>&1 || die "$b not found; run: bash slurm/install.sh"
done
if [ "$ACCOUNTING" = 1 ]; then
    for b in slurmdbd mariadbd mariadb-install-db; do
        command -v $b >/dev/null 2>&1 ||
            die "$b not found; run: bash slurm/install.sh (or set TOKENBENCH_SLURM_ACCOUNTING=0)"
    done
fi
if ! alive "$D/run/slurmctld.pid" && ! alive "$D/run/slurmd.pid" && ! alive "$D/run/slurmdbd.pid" &&
   ! alive "$D/run/mysqld/mariadbd.pid"; then
    # Cold start: no state from an earlier cluster here (old jobs, job ids, accounting rows).
    rm -rf "$D/state" "$D/spool" "$D/mysql" "$D/run/mysqld" "$D"/run/*.pid
fi
mkdir -p "$D"/{etc,log,run,state,spool/slurmd}

# ---- munge: a munged of this cluster's own (its socket in $D), so that clusters never share one ---------
SOCK="$D/run/munge/munge.socket"
munge_ok() { munge -n --socket="$SOCK" 2>/dev/null | unmunge --socket="$SOCK" >/dev/null 2>&1; }
if alive "$D/run/munge/munged.pid" && munge_ok; then
    say "munged is running"
else
    mkdir -p "$D/run/munge" /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key "$D/run/munge"
    chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 "$D/run/munge"
    rm -f "$SOCK" "$SOCK.lock"
    touch "$D/log/munged.log"; chown munge:munge "$D/log/munged.log"
    su -s /bin/sh munge -c "munged --socket=$SOCK --pid-file=$D/run/munge/munged.pid \
        --seed-file=$D/run/munge/munged.seed --log-file=$D/log/munged.log" 9>&- || die "munged did not start"
    wait_for 20 "munged" munge_ok
    say "munged started"
fi

# ---- generated configuration (kept as is while the cluster runs) --------------------------------------
if ! alive "$D/run/slurmctld.pid"; then
    HW="$(slurmd -C | head -n 1)"   # NodeName=… CPUs=… Boards=… SocketsPerBoard=… … RealMemory=…
    CPUS_REAL="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")"
    MEM_REAL="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")"
    CPUS="${TOKENBENCH_SLURM_CPUS:-$CPUS_REAL}"
    if [ "$CPUS" -eq "$CPUS_REAL" ]; then    # the real topology, so slurmd agrees with it
        NODE_CPUS="$(sed 's/^NodeName=[^ ]* //; s/ RealMemory=.*//' <<<"$HW")"
    else
        NODE_CPUS="CPUs=$CPUS"
    fi
    MEM="${TOKENBENCH_SLURM_MEM_MB:-$(( MEM_REAL > 1536 ? MEM_REAL - 512 : MEM_REAL ))}"
    GRES_NODE="" ; GRES_TYPES=""
    if [ "$GPUS" -gt 0 ]; then GRES_NODE="Gres=gpu:$GPUS"; GRES_TYPES="GresTypes=gpu"; fi
    if [ "$ACCOUNTING" = 1 ]; then
        ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
# With slurmdbd, AccountingStoragePass names the munge socket for the connections to slurmdbd.
AccountingStoragePass=$SOCK
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
    else
        ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
    fi
    cat > "$CONF" <<EOF
# Generated by tokenbench slurm/start.sh on $(date -Is) for host $HOST; regenerated at every cold start.
ClusterName=tokenbench
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# This cluster's munged; a requeued job waits cred_expire+1 s before it may start again (default 120 s).
AuthInfo=socket=$SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here (containers, CI): plain process tracking and no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Requeue: \`scontrol requeue\`, preemption and submitit's own requeue after a time-limit signal.
JobRequeue=1
KillWait=$KILLWAIT
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
DefMemPerCPU=1024
# Preemption: jobs in partition 'urgent' requeue the jobs they need room from.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
$GRES_TYPES
$ACCT
JobCompType=jobcomp/none

NodeName=$HOST NodeAddr=127.0.0.1 $NODE_CPUS RealMemory=$MEM $GRES_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 OverSubscribe=NO
PartitionName=urgent Nodes=$HOST Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    # More CPUs than the machine has: slurmd must trust the config rather than the hardware.
    if [ "$CPUS" -ne "$CPUS_REAL" ]; then echo "SlurmdParameters=config_overrides" >> "$CONF"; fi
    # Fake GPUs: slurmd drops a gpu gres without File=, and wants File= to be a device; links to
    # /dev/null named nvidia<N> are devices that no program can mistake for a GPU.
    if [ "$GPUS" -gt 0 ]; then
        rm -rf "${D:?}/dev"; mkdir -p "$D/dev"
        for i in $(seq 0 $((GPUS - 1))); do ln -s /dev/null "$D/dev/nvidia$i"; done
        printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s/dev/nvidia[0-%s]\n' "$HOST" "$D" $((GPUS - 1)) \
            > "$D/etc/gres.conf"
    else
        : > "$D/etc/gres.conf"
    fi
    chmod 0644 "$D"/etc/*.conf
fi

# ---- accounting: MariaDB (own datadir, TCP on 127.0.0.1) and slurmdbd ---------------------------------
if [ "$ACCOUNTING" = 1 ]; then
    DB="$D/mysql"
    if alive "$D/run/mysqld/mariadbd.pid"; then
        say "mariadbd is running"
    else
        if [ ! -d "$DB/mysql" ]; then
            mkdir -p "$DB"; chown mysql:mysql "$DB"
            mariadb-install-db --user=mysql --datadir="$DB" --auth-root-authentication-method=socket \
                --skip-test-db > "$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
        fi
        mkdir -p "$D/run/mysqld"; chown mysql:mysql "$D/run/mysqld"
        # --no-defaults: ignore /etc/mysql (a system server may be configured there).
        (setsid mariadbd --no-defaults --user=mysql --datadir="$DB" --socket="$D/run/mysqld/mysqld.sock" \
            --pid-file="$D/run/mysqld/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
            --skip-name-resolve --innodb-buffer-pool-size=128M --innodb-log-file-size=64M \
            --innodb-lock-wait-timeout=900 \
            --log-error="$D/log/mariadbd.log" </dev/null >/dev/null 2>&1 9>&- &)
        wait_for 60 "mariadbd" mariadb --no-defaults --socket="$D/run/mysqld/mysqld.sock" -uroot -e "select 1"
        mariadb --no-defaults --socket="$D/run/mysqld/mysqld.sock" -uroot -e "
            CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'tokenbench';
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'tokenbench';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" ||
            die "could not create the accounting database"
        say "mariadbd started"
    fi
    if alive "$D/run/slurmdbd.pid"; then
        say "slurmdbd is running"
    else
        cat > "$D/etc/slurmdbd.conf" <<EOF
# Generated by tokenbench slurm/start.sh
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=tokenbench
StorageLoc=slurm_acct_db
EOF
        chmod 0600 "$D/etc/slurmdbd.conf"
        # slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF.
        slurmdbd 9>&- || die "slurmdbd did not start"
        wait_for 60 "slurmdbd" bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
        say "slurmdbd started"
    fi
fi

# ---- slurmctld and slurmd ------------------------------------------------------------------------------
if alive "$D/run/slurmctld.pid"; then
    say "slurmctld is running"
else
    slurmctld -i 9>&- || die "slurmctld did not start"   # -i: start even if a state file is unreadable
    wait_for 60 "slurmctld" scontrol ping
    say "slurmctld started"
fi
if [ "$ACCOUNTING" = 1 ] && ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx tokenbench
then
    # Normally slurmctld registers itself; make sure (sacct needs the cluster in the database).
    sacctmgr -i add cluster tokenbench >/dev/null 2>&1 || true
fi
if alive "$D/run/slurmd.pid"; then
    say "slurmd is running"
else
    slurmd -N "$HOST" 9>&- || die "slurmd did not start"
    say "slurmd started"
fi

node_ready() { sinfo -h -n "$HOST" -o '%T' | grep -Eq '^(idle|mixed|allocated|completing)$'; }
wait_for "$TIMEOUT" "node $HOST to become idle (see: sinfo -R; scontrol show node)" node_ready
if [ "$ACCOUNTING" = 1 ]; then wait_for 30 "sacct" sacct -n -X -S now; fi

# ---- making the commands find the cluster ---------------------------------------------------------------
cat > "$D/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF
if [ "$LINK_ETC" = 1 ]; then
    mkdir -p /etc/slurm
    if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
        ln -sfn "$CONF" /etc/slurm/slurm.conf
    fi
fi
say "cluster is up: $(sinfo -h -o '%P %D node(s) %T, %c CPUs, %m MB, gres %G' | tr '\n' ';')"
[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ] || say "use it with: source $D/env.sh"
