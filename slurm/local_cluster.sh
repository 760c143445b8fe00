#!/usr/bin/env bash
# A real Slurm on one machine, for the tests and for trying the sbatch scripts locally.
#
#   bash slurm/local_cluster.sh start [--nodes 1|2]   # install if missing, start, wait until usable
#   bash slurm/local_cluster.sh stop                  # cancel all jobs, stop every daemon by PID
#   bash slurm/local_cluster.sh status                # what runs (exit 0: all up, 3: not)
#   eval "$(bash slurm/local_cluster.sh env)"         # point sbatch/srun/sacct at this cluster
#
# Debian slurm-wlm (slurmctld, two slurmd instances posing as node1/node2), a private munged, and
# accounting through slurmdbd + a private mariadbd (submitit polls sacct). Everything lives under
# $RCN_SLURM_DIR (default /tmp/rcn-slurm): configs, state, spool, logs, PID files, database. The
# system's own /etc/slurm and /run/munge are never read or written; the one system change is a
# "127.0.0.1 node1 node2" line in /etc/hosts when those names do not resolve. Needs root.
set -euo pipefail

DIR=${RCN_SLURM_DIR:-/tmp/rcn-slurm}
CLUSTER=rcn
# Ports away from Slurm's defaults (6817-6819) and MariaDB's (3306): slurmctld on P, slurmd on
# P+1 and P+2, slurmdbd on P+10, mariadbd on P+20. A second cluster needs another dir and P.
PORT=${RCN_SLURM_PORT:-17000}
START_TIMEOUT=${RCN_SLURM_START_TIMEOUT:-90}
CPUS=${RCN_SLURM_CPUS:-2} # per fake node; overcommitting the real cores is fine for tests
# Checked before any arithmetic: bash evaluates $(...) inside a variable used in $((...)).
for _v in PORT START_TIMEOUT CPUS; do
    if [[ ! ${!_v} =~ ^[1-9][0-9]*$ ]]; then
        echo "local_cluster: error: RCN_SLURM_$_v must be a positive integer, got '${!_v}'" >&2
        exit 1
    fi
done
CTLD_PORT=$PORT DBD_PORT=$((PORT + 10)) DB_PORT=$((PORT + 20))

ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log MUNGE=$DIR/munge DB=$DIR/mysql
export SLURM_CONF=$ETC/slurm.conf

die() {
    echo "local_cluster: error: $*" >&2
    exit 1
}
say() { echo "local_cluster: $*"; }

# alive PID: true while PID runs. A zombie counts as gone: PID 1 here may reap orphans seconds late.
alive() {
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) && [[ ${st:0:1} != Z ]]
}

# pid_of NAME PIDFILE: print the PID if PIDFILE names a live process whose command is NAME.
# Checking the command guards against a stale file whose PID now belongs to someone else.
pid_of() {
    local pid
    [[ -r $2 ]] || return 1
    pid=$(tr -dc '0-9' <"$2")
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] && alive "$pid" || return 1
    echo "$pid"
}

# The daemons as "name pidfile" lines, in start order.
daemons() {
    echo "munged $MUNGE/munged.pid"
    echo "mariadbd $DB/mysqld.pid"
    echo "slurmdbd $RUN/slurmdbd.pid"
    echo "slurmctld $RUN/slurmctld.pid"
    local n
    for n in $(configured_nodes); do echo "slurmd $RUN/slurmd-$n.pid"; done
}

configured_nodes() {
    [[ -r $SLURM_CONF ]] && sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$SLURM_CONF"
}

install_packages() {
    local bin missing=0
    for bin in slurmctld slurmd slurmdbd sbatch munged mariadbd mpirun; do
        command -v "$bin" >/dev/null || missing=1
    done
    ((missing)) || return 0
    say "installing Slurm, munge, MariaDB and Open MPI with apt-get"
    local pkgs=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server openmpi-bin libopenmpi-dev)
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${pkgs[@]}" >"$LOG/apt.log" 2>&1 ||
        { apt-get update -q >>"$LOG/apt.log" 2>&1 && apt-get install -y -q "${pkgs[@]}" >>"$LOG/apt.log" 2>&1; } ||
        die "apt-get install failed, see $LOG/apt.log"
}

write_configs() {
    local nodes=$1 host mem_mb i names=()
    host=$(hostname -s)
    # Both fake nodes see the whole machine; slurmd refuses a node whose RealMemory exceeds it.
    mem_mb=$(awk '/^MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    for ((i = 1; i <= nodes; i++)); do names+=("node$i"); done
    {
        cat <<EOF
# Written by slurm/local_cluster.sh; regenerated on every start.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~12 s instead of ~2 minutes.
AuthInfo=socket=$MUNGE/munge.socket.2,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
# pmix keeps per-node server directories under TmpFS; one shared directory makes the second
# node's step fail with "File exists".
TmpFS=$DIR/tmp/%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
MpiDefault=pmix
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=60
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# Connections to slurmdbd take their munge socket from here, not from AuthInfo.
AccountingStoragePass=$MUNGE/munge.socket.2
JobAcctGatherType=jobacct_gather/none
EOF
        for ((i = 1; i <= nodes; i++)); do
            echo "NodeName=node$i NodeAddr=127.0.0.1 Port=$((CTLD_PORT + i)) CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP"
    } >"$SLURM_CONF"

    [[ -s $ETC/db.secret ]] || (umask 077 && od -An -N12 -tx1 /dev/urandom | tr -d ' \n' >"$ETC/db.secret")
    (
        umask 077
        cat >"$ETC/slurmdbd.conf" <<EOF
# Written by slurm/local_cluster.sh; slurmdbd insists on mode 600.
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket.2
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db.secret")
StorageLoc=slurm_acct_db
EOF
    )
}

ensure_hosts() {
    local n missing=()
    for n in "$@"; do getent hosts "$n" >/dev/null || missing+=("$n"); done
    ((${#missing[@]} == 0)) && return 0
    # A hosts file without a final newline would glue our line onto its last one. (Reading its
    # last byte while the group appends to it is safe: nothing is truncated.)
    # shellcheck disable=SC2094,SC2015
    { [[ -z $(tail -c1 /etc/hosts) ]] || echo; } >>/etc/hosts &&
        echo "127.0.0.1 ${missing[*]}" >>/etc/hosts ||
        die "cannot add '127.0.0.1 ${missing[*]}' to /etc/hosts; add it by hand"
}

# wait_for SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s; die naming the logs when it never succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2 out
    shift 2
    until out=$("$@" 2>&1); do
        if ((SECONDS >= deadline)); then
            [[ -z $out ]] || echo "$out" | tail -n 3 >&2
            die "timed out waiting for $what; logs: $LOG/*.log $MUNGE/munged.log $DB/mysqld.log"
        fi
        sleep 0.2
    done
}

sql() { mariadb --no-defaults --socket="$DB/mysqld.sock" -uroot "$@"; }

start_munged() {
    if [[ ! -s $MUNGE/munge.key ]]; then
        mungekey --create --keyfile="$MUNGE/munge.key" >/dev/null 2>&1 ||
            dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    fi
    # munged runs as user munge and rejects a socket directory that others cannot traverse.
    chown -R munge:munge "$MUNGE"
    chmod 755 "$MUNGE"
    chmod 600 "$MUNGE/munge.key"
    rm -f "$MUNGE/munge.socket.2" "$MUNGE/munge.socket.2.lock"
    runuser -u munge -- munged --socket="$MUNGE/munge.socket.2" --key-file="$MUNGE/munge.key" \
        --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" 9>&- ||
        die "munged did not start, see $MUNGE/munged.log"
}

start_mariadbd() {
    if [[ ! -d $DB/data/mysql ]]; then
        mariadb-install-db --no-defaults --datadir="$DB/data" --user=root --skip-test-db \
            >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed, see $LOG/mariadb-install.log"
    fi
    # setsid: the server must not die with the shell that started it (no systemd here).
    setsid mariadbd --no-defaults --datadir="$DB/data" --user=root --socket="$DB/mysqld.sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$DB/mysqld.pid" \
        --log-error="$DB/mysqld.log" --skip-log-bin --innodb-buffer-pool-size=32M \
        </dev/null >/dev/null 2>&1 9>&- &
    local pid=$! deadline=$((SECONDS + 60))
    until sql -e 'SELECT 1' >/dev/null 2>&1; do
        alive "$pid" || die "mariadbd exited at start, see $DB/mysqld.log"
        ((SECONDS < deadline)) || die "timed out waiting for mariadbd, see $DB/mysqld.log"
        sleep 0.2
    done
}

setup_database() {
    local pass
    pass=$(cat "$ETC/db.secret")
    sql <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

nodes_ready() {
    local want=$1 states
    states=$(sinfo -h -N -o '%N %t') || return 1
    echo "$states"
    (($(awk '$2 ~ /^(idle|mix|alloc|comp)/' <<<"$states" | sort -u | wc -l) == want))
}

cmd_start() {
    local nodes=2
    while (($#)); do
        case $1 in
        --nodes) nodes=${2:-}; shift 2 || die "--nodes needs a value" ;;
        --nodes=*) nodes=${1#--nodes=}; shift ;;
        *) die "unknown option for start: $1" ;;
        esac
    done
    [[ $nodes == 1 || $nodes == 2 ]] || die "--nodes must be 1 or 2, got '$nodes'"
    [[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "RCN_SLURM_CPUS must be a positive integer, got '$CPUS'"
    [[ $PORT =~ ^[1-9][0-9]*$ ]] || die "RCN_SLURM_PORT must be a port number, got '$PORT'"
    ((EUID == 0)) || die "must run as root (munged, slurmd and the /etc/hosts entry need it)"
    local t0=$SECONDS running
    mkdir -p "$ETC" "$RUN" "$LOG" "$MUNGE" "$DB" "$DIR/state" "$DIR/spool" "$DIR/tmp"
    chmod 755 "$DIR"

    if pid_of slurmctld "$RUN/slurmctld.pid" >/dev/null; then
        running=$(configured_nodes | wc -l)
        ((running == nodes)) || die "already running with $running node(s); stop it first to change to $nodes"
    else
        install_packages
        write_configs "$nodes"
    fi
    local i names=()
    for ((i = 1; i <= nodes; i++)); do names+=("node$i"); done
    ensure_hosts "${names[@]}"
    for i in "${names[@]}"; do mkdir -p "$DIR/spool/$i" "$DIR/tmp/$i"; done

    pid_of munged "$MUNGE/munged.pid" >/dev/null || start_munged
    pid_of mariadbd "$DB/mysqld.pid" >/dev/null || start_mariadbd
    setup_database
    if ! pid_of slurmdbd "$RUN/slurmdbd.pid" >/dev/null; then
        slurmdbd 9>&- || die "slurmdbd did not start, see $LOG/slurmdbd.log"
    fi
    wait_for 30 "slurmdbd" sacctmgr -n list cluster
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
    if ! pid_of slurmctld "$RUN/slurmctld.pid" >/dev/null; then
        slurmctld 9>&- || die "slurmctld did not start, see $LOG/slurmctld.log"
    fi
    for i in "${names[@]}"; do
        if ! pid_of slurmd "$RUN/slurmd-$i.pid" >/dev/null; then
            slurmd -N "$i" 9>&- || die "slurmd -N $i did not start, see $LOG/slurmd-$i.log"
        fi
    done
    wait_for "$START_TIMEOUT" "${nodes} node(s) to be idle in sinfo" nodes_ready "$nodes"
    wait_for 30 "sacct to answer" sacct -n -X -S now-1minutes
    say "running: ${names[*]} ($CPUS CPUs each), up in $((SECONDS - t0)) s; SLURM_CONF=$SLURM_CONF"
}

# stop_pid NAME PIDFILE: TERM, wait up to 30 s, then KILL; only the process the PID file names.
stop_pid() {
    local pid i
    pid=$(pid_of "$1" "$2") || { rm -f "$2"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        alive "$pid" || break
        sleep 0.2
    done
    if alive "$pid"; then
        say "$1 ($pid) ignored SIGTERM for 30 s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$2"
}

cmd_stop() {
    local t0=$SECONDS jobs line i
    if pid_of slurmctld "$RUN/slurmctld.pid" >/dev/null; then
        # Jobs' slurmstepd processes outlive slurmd by design: end the jobs first so nothing stays.
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 150; i++)); do
                [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    # Reverse start order: slurmd first, munged last. The slurmd PID files are globbed so that a
    # node from an earlier --nodes setting is stopped too.
    for line in "$RUN"/slurmd-*.pid; do
        [[ -e $line ]] && stop_pid slurmd "$line"
    done
    stop_pid slurmctld "$RUN/slurmctld.pid"
    stop_pid slurmdbd "$RUN/slurmdbd.pid"
    stop_pid mariadbd "$DB/mysqld.pid"
    stop_pid munged "$MUNGE/munged.pid"
    say "stopped in $((SECONDS - t0)) s"
}

cmd_status() {
    local name file pid all=0
    [[ -r $SLURM_CONF ]] || { say "not set up ($SLURM_CONF missing)"; exit 3; }
    while read -r name file; do
        if pid=$(pid_of "$name" "$file"); then
            printf '%-10s %-8s running  %s\n' "$name" "$pid" "$file"
        else
            printf '%-10s %-8s stopped  %s\n' "$name" - "$file"
            all=3
        fi
    done < <(daemons)
    if ((all == 0)); then
        sinfo -N -o '%N %t %c' || true
    fi
    exit "$all"
}

# lock: one start or stop at a time (parallel test workers may each call start). The daemons are
# started with fd 9 closed, else they would hold the lock for their whole life.
lock() {
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock -w 300 9 || die "another local_cluster.sh start/stop holds $DIR/.lock"
}

case ${1:-} in
start) shift; lock; cmd_start "$@" ;;
stop) lock; cmd_stop ;;
status) cmd_status ;;
env) printf 'export SLURM_CONF=%q\n' "$SLURM_CONF" ;;
*)
    echo "usage: $0 {start [--nodes 1|2] | stop | status | env}   (work dir: \$RCN_SLURM_DIR=$DIR)" >&2
    exit 2
    ;;
esac
