#!/usr/bin/env bash
# Provide PostgreSQL and Redis for the test suite.
#
#   eval "$(bash scripts/services.sh up)"   # exports CCAT_TEST_POSTGRES_URL, CCAT_TEST_REDIS_URL,
#                                           # CCAT_TEST_SLURM_CONF
#   bash scripts/services.sh down           # stops whatever `up` started
#   bash scripts/services.sh restart postgres|redis   # a private server, on its port
#                                           # (PostgreSQL as after a crash; Redis loses
#                                           # what it held: the soak test's faults)
#
# URLs already set in the environment are checked and used as given; otherwise
# private throw-away servers are started on free ports, with state (data, logs,
# ports, pids) in ${CCAT_TEST_SERVICES_DIR:-$PWD/.services}. SLURM is a real one-node
# cluster (munged, slurmctld, slurmd from Debian's packages) with its own munge key and
# ports; a given CCAT_TEST_SLURM_CONF is used as it is.
# Only the export lines go to stdout, so `eval` sees nothing else.
set -euo pipefail

# As root the servers run as the postgres user, which may not reach a checkout under a
# private home (/root is 0700); then the state goes under /tmp, one dir per checkout.
default_state=$PWD/.services
if [[ $(id -u) -eq 0 ]] && ! runuser -u postgres -- test -x "$PWD" 2>/dev/null; then
  default_state=/tmp/ccat-wfm-services-$(printf %s "$PWD" | sha1sum | cut -c1-12)
fi
STATE=${CCAT_TEST_SERVICES_DIR:-$default_state}
TIMEOUT=${CCAT_TEST_SERVICES_TIMEOUT:-30}   # seconds to wait for a server to answer
PG_DIR=$STATE/pg                             # owned by the postgres user when we are root
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log
REDIS_PID=$STATE/redis.pid
REDIS_LOG=$STATE/redis.log
SLURM_DIR=$STATE/slurm

log() { echo "services.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Newest PostgreSQL server bin dir from the Debian packages (empty if none).
pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1) || true
  [[ -n $d && -x $d/initdb ]] && echo "$d" || true
}

# initdb/postgres refuse to run as root, so run them as the postgres user then.
as_pg() {
  # cd / so the postgres user is not left in a directory it may not read.
  if [[ $(id -u) -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# Install what is missing: only as root on Debian, otherwise say what to install.
ensure_installed() {
  local need_pg=$1 need_redis=$2 pkgs=()
  [[ $need_pg == 1 && -z $(pg_bin) ]] && pkgs+=(postgresql)
  [[ $need_redis == 1 ]] && ! command -v redis-server >/dev/null && pkgs+=(redis-server)
  [[ $need_redis == 1 ]] && ! command -v redis-cli >/dev/null && pkgs+=(redis-tools)
  if [[ ${3:-0} == 1 ]]; then
    command -v slurmctld >/dev/null || pkgs+=(slurmctld)
    command -v slurmd >/dev/null || pkgs+=(slurmd)
    command -v sbatch >/dev/null || pkgs+=(slurm-client)
    command -v munged >/dev/null || pkgs+=(munge)
  fi
  [[ ${#pkgs[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 || ! -f /etc/debian_version ]]; then
    die "missing ${pkgs[*]}; install them (Debian: apt-get install postgresql redis-server" \
        "slurmctld slurmd slurm-client munge)" \
        "or set CCAT_TEST_POSTGRES_URL / CCAT_TEST_REDIS_URL to existing servers"
  fi
  log "installing ${pkgs[*]}"
  # The postgresql postinst may start a default cluster on 5432; harmless, we don't use it.
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
}

# First port >= $1 that nothing on 127.0.0.1 accepts connections on.
free_port() {
  local p=$1
  while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do
    p=$((p + 1))
    [[ $p -lt $(($1 + 500)) ]] || die "no free port in $1..$p"
  done
  echo "$p"
}

# Poll "$@" until it succeeds or TIMEOUT passes; on failure show the log tail.
wait_ready() {
  local what=$1 logfile=$2 deadline=$((SECONDS + TIMEOUT))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [[ $SECONDS -ge $deadline ]]; then
      log "$what did not answer within ${TIMEOUT}s; last lines of $logfile:"
      tail -n 30 "$logfile" >&2 || true
      exit 1
    fi
    sleep 0.2
  done
}

pg_ready() { "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$1" -U postgres; }
redis_ping() { [[ $(redis-cli "$@" ping 2>/dev/null) == PONG ]]; }

# Prints the URL of a running private PostgreSQL, reusing the previous one if alive.
pg_up() {
  local bin port
  bin=$(pg_bin)
  if [[ -f $STATE/pg.port ]] && port=$(<"$STATE/pg.port") &&
     as_pg "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1 && pg_ready "$port"; then
    log "reusing PostgreSQL on port $port"
  else
    # Throw-away instance: anything left over is stale, start from a fresh cluster.
    [[ -d $PG_DATA ]] && as_pg "$bin/pg_ctl" -D "$PG_DATA" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
    mkdir -p "$PG_DIR"
    if [[ $(id -u) -eq 0 ]]; then
      id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
      chown postgres: "$PG_DIR"
      runuser -u postgres -- test -w "$PG_DIR" ||
        die "user postgres cannot reach $PG_DIR; set CCAT_TEST_SERVICES_DIR to e.g. /tmp/ccat-services"
    fi
    port=$(free_port 55432)
    log "starting PostgreSQL $(basename "$(dirname "$bin")") on 127.0.0.1:$port (data: $PG_DATA)"
    as_pg "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --no-locale --no-sync >/dev/null
    # Durability is pointless for test data; turning it off makes tests much faster.
    # The socket lives in our dir so we never need /var/run/postgresql.
    cat >>"$PG_DATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$PG_DIR'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    # pg_ctl's own chatter goes to the log; the server keeps no handle on our stdout.
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -t "$TIMEOUT" start >>"$PG_LOG.ctl" 2>&1 </dev/null ||
      { tail -n 30 "$PG_LOG.ctl" "$PG_LOG" >&2 2>/dev/null; die "pg_ctl start failed"; }
    wait_ready PostgreSQL "$PG_LOG" pg_ready "$port"
    echo "$port" >"$STATE/pg.port"
  fi
  echo "postgres://postgres@127.0.0.1:$port/postgres"
}

# Prints the URL of a running private Redis, reusing the previous one if alive.
redis_up() {
  local port
  if [[ -f $STATE/redis.port && -f $REDIS_PID ]] && port=$(<"$STATE/redis.port") &&
     kill -0 "$(<"$REDIS_PID")" 2>/dev/null && redis_ping -p "$port"; then
    log "reusing Redis on port $port"
  else
    port=$(free_port 56379)
    log "starting Redis on 127.0.0.1:$port"
    rm -f "$REDIS_PID"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --daemonize yes --dir "$STATE" --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" \
      </dev/null >/dev/null 2>&1 || die "redis-server failed to start (see $REDIS_LOG)"
    wait_ready Redis "$REDIS_LOG" redis_ping -p "$port"
    echo "$port" >"$STATE/redis.port"
  fi
  echo "redis://127.0.0.1:$port/0"
}

slurm_ready() {
  SLURM_CONF=$1 sinfo --noheader --states=idle,mixed,allocated --format=%N 2>/dev/null | grep -q .
}

# Prints the slurm.conf of a running private one-node cluster, reusing the previous one.
# Jobs run as the calling user; the node claims more CPUs than the machine has, so many
# small test jobs run at once.
slurm_up() {
  local conf=$SLURM_DIR/slurm.conf user host ctld_port d_port p pid alive=1
  for p in munged slurmctld slurmd; do
    pid=$(cat "$SLURM_DIR/$p.pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null || alive=0
  done
  if [[ $alive == 1 && -f $conf ]] && slurm_ready "$conf"; then
    log "reusing SLURM ($conf)"
    echo "$conf"
    return
  fi
  slurm_down
  mkdir -p "$SLURM_DIR/ctld" "$SLURM_DIR/spool" "$SLURM_DIR/munge"
  chmod 700 "$SLURM_DIR/munge"
  user=$(id -un)
  host=$(hostname -s)
  ctld_port=$(free_port 56817)
  d_port=$(free_port $((ctld_port + 1)))
  dd if=/dev/urandom of="$SLURM_DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$SLURM_DIR/munge/munge.key"
  log "starting SLURM (munged, slurmctld on port $ctld_port, slurmd on port $d_port)"
  munged --socket="$SLURM_DIR/munge/munge.socket" --key-file="$SLURM_DIR/munge/munge.key" \
    --pid-file="$SLURM_DIR/munged.pid" --log-file="$SLURM_DIR/munged.log" \
    --seed-file="$SLURM_DIR/munge/seed" --force </dev/null >&2 ||
    die "munged failed to start (see $SLURM_DIR/munged.log)"
  cat >"$conf" <<EOF
ClusterName=ccattest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$SLURM_DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$SLURM_DIR/ctld
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/slurmctld.log
SlurmdLogFile=$SLURM_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
DefMemPerCPU=100
MpiDefault=none
ReturnToService=2
# SLURM's default: the controller forgets a finished job after five minutes, and the
# managers must not depend on it remembering longer.
MinJobAge=300
MaxJobCount=50000
KillWait=5
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=64 RealMemory=64000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  SLURM_CONF=$conf slurmctld -f "$conf" </dev/null >&2 ||
    { tail -n 30 "$SLURM_DIR/slurmctld.log" >&2 2>/dev/null; die "slurmctld failed to start"; }
  SLURM_CONF=$conf slurmd -f "$conf" </dev/null >&2 ||
    { tail -n 30 "$SLURM_DIR/slurmd.log" >&2 2>/dev/null; die "slurmd failed to start"; }
  wait_ready SLURM "$SLURM_DIR/slurmctld.log" slurm_ready "$conf"
  echo "$conf"
}

# Stops the private cluster's daemons (known by their pid files) and drops its state.
slurm_down() {
  local p pid
  for p in slurmd slurmctld munged; do
    [[ -f $SLURM_DIR/$p.pid ]] || continue
    pid=$(<"$SLURM_DIR/$p.pid")
    # Check the name so a stale pid file never makes us kill an unrelated process.
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$p"* ]] && kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  rm -rf "$SLURM_DIR"
}

cmd_up() {
  local pg_url=${CCAT_TEST_POSTGRES_URL:-} redis_url=${CCAT_TEST_REDIS_URL:-}
  local slurm_conf=${CCAT_TEST_SLURM_CONF:-}
  # Given URLs still need pg_isready / redis-cli to check them.
  ensure_installed "$([[ -n $pg_url ]] && command -v pg_isready >/dev/null && echo 0 || echo 1)" 1 \
    "$([[ -n $slurm_conf ]] && echo 0 || echo 1)"
  if [[ -z $pg_url || -z $redis_url || -z $slurm_conf ]]; then
    mkdir -p "$STATE"
    STATE=$(cd "$STATE" && pwd)   # absolute: servers keep these paths after we exit
    PG_DIR=$STATE/pg PG_DATA=$STATE/pg/data PG_LOG=$STATE/pg/postgres.log
    REDIS_PID=$STATE/redis.pid REDIS_LOG=$STATE/redis.log SLURM_DIR=$STATE/slurm
  fi

  if [[ -n $pg_url ]]; then
    local isready
    isready=$(command -v pg_isready || echo "$(pg_bin)/pg_isready")
    "$isready" -q -d "$pg_url" || die "CCAT_TEST_POSTGRES_URL=$pg_url does not answer"
    log "using given PostgreSQL $pg_url"
  else
    pg_url=$(pg_up)
  fi
  if [[ -n $redis_url ]]; then
    redis_ping -u "$redis_url" || die "CCAT_TEST_REDIS_URL=$redis_url does not answer"
    log "using given Redis $redis_url"
  else
    redis_url=$(redis_up)
  fi
  if [[ -n $slurm_conf ]]; then
    slurm_ready "$slurm_conf" || die "CCAT_TEST_SLURM_CONF=$slurm_conf: no idle SLURM node answers"
    log "using given SLURM $slurm_conf"
  else
    slurm_conf=$(slurm_up)
  fi
  printf 'export CCAT_TEST_POSTGRES_URL=%q\n' "$pg_url"
  printf 'export CCAT_TEST_REDIS_URL=%q\n' "$redis_url"
  printf 'export CCAT_TEST_SLURM_CONF=%q\n' "$slurm_conf"
}

# Stop only what this script started (known from the state dir), then drop its files.
cmd_down() {
  [[ -d $STATE ]] || { log "nothing to stop ($STATE does not exist)"; return 0; }
  local bin pid
  bin=$(pg_bin)
  if [[ -d $PG_DATA && -n $bin ]]; then
    log "stopping PostgreSQL"
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
  if [[ -f $REDIS_PID ]]; then
    pid=$(<"$REDIS_PID")
    log "stopping Redis (pid $pid)"
    # Check the name so a stale pid file never makes us kill an unrelated process.
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]] && kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  if [[ -d $SLURM_DIR ]]; then log "stopping SLURM"; slurm_down; fi
  # Remove only our own files, so a mistaken CCAT_TEST_SERVICES_DIR loses nothing else.
  rm -rf "$PG_DIR"
  rm -f "$STATE/pg.port" "$STATE/redis.port" "$REDIS_PID" "$REDIS_LOG"
  rmdir "$STATE" 2>/dev/null || true
}

# Restart a private server that `up` started, on the same port.
cmd_restart() {
  local pid port
  case ${1:-} in
    postgres)
      [[ -d $PG_DATA ]] || die "no private PostgreSQL under $STATE"
      port=$(<"$STATE/pg.port")
      # Immediate: no shutdown checkpoint, so the server starts with crash recovery.
      as_pg "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m immediate -w stop >>"$PG_LOG.ctl" 2>&1 </dev/null ||
        die "pg_ctl stop failed"
      as_pg "$(pg_bin)/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -t "$TIMEOUT" start >>"$PG_LOG.ctl" 2>&1 </dev/null ||
        die "pg_ctl start failed"
      wait_ready PostgreSQL "$PG_LOG" pg_ready "$port"
      ;;
    redis)
      [[ -f $REDIS_PID && -f $STATE/redis.port ]] || die "no private Redis under $STATE"
      pid=$(<"$REDIS_PID") port=$(<"$STATE/redis.port")
      [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]] && kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$REDIS_PID"
      redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --daemonize yes --dir "$STATE" --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" \
        </dev/null >/dev/null 2>&1 || die "redis-server failed to start (see $REDIS_LOG)"
      wait_ready Redis "$REDIS_LOG" redis_ping -p "$port"
      ;;
    *) die "restart postgres|redis" ;;
  esac
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  restart) cmd_restart "${2:-}" ;;
  *) echo "usage: $0 up|down|restart postgres|redis   (use as: eval \"\$($0 up)\")" >&2; exit 2 ;;
esac
