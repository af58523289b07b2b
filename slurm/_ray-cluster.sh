# shellcheck shell=bash
# Sourced by slurm/train-folds.sbatch and slurm/predict.sbatch (not a job script
# itself). Starts a Ray cluster over the job's nodes the way Ray's SLURM guide
# does -- one task per node, `ray start --head --block` on the first node, `ray
# start --block` on the others, all as srun job steps -- waits until every node
# has joined, and tears it down again on any exit of the batch script.
#
# After `ray_cluster_up`: RAY_ADDRESS=<head ip>:<port> is exported for the driver.
#
# Overridable (environment or `sbatch --export=ALL,NAME=value`):
#   RAY_PORT        head GCS port; default 20000 + job id % 10000, so two jobs that
#                   share a node do not collide (Ray's own default is 6379)
#   RAY_TMP         per-node Ray temp dir, kept short: Ray puts unix sockets under
#                   it and socket paths are limited to 107 bytes (default /tmp/ray-<job id>);
#                   removed after a successful job, kept after a failed one for its logs
#   RAY_AUTH_MODE   "token" (default): a fresh random token per job, passed to every
#                   node in RAY_AUTH_TOKEN through srun's environment; "disabled" turns
#                   authentication off. A RAY_AUTH_TOKEN you set yourself is used as is.
#   RAY_WAIT        seconds to wait for all nodes to join (default 300)
#   RAY_STOP        1 (default): run `ray stop` on the batch node at exit as a final
#                   sweep. It stops *every* Ray process of your user on that node, so
#                   set 0 when other Ray jobs of yours may share the node; each node's
#                   own `ray start --block` still tears down its processes when the
#                   step is signalled.
#   RAY_HEAD_ARGS, RAY_WORKER_ARGS   extra `ray start` arguments
#   RAY_DASHBOARD   true|false (default false: saves a process per job on small nodes)
#   RAY_OBJECT_STORE_BYTES  object store size per node; default 30% of --mem when
#                   the job asked for memory (Ray would take 30% of the whole node)

_ray_log() { echo "[ray-cluster $(date +%H:%M:%S)] $*" >&2; }

_ray_step_pids=()
_ray_driver_pid=""
_ray_stopped=0

ray_cluster_down() {
  # Runs from the EXIT trap: every way out of the batch script passes here once.
  local rc=$?
  [ "$_ray_stopped" = 1 ] && return "$rc"
  _ray_stopped=1
  trap - EXIT INT TERM
  set +e  # best effort from here on: a process already gone is not an error
  _ray_log "stopping Ray (exit code $rc)"
  if [ -n "$_ray_driver_pid" ]; then
    # A driver whose cluster is going away can hang in its own shutdown; give it
    # a few seconds (SLURM's KillWait is the hard limit), then end it.
    kill -TERM "$_ray_driver_pid" 2>/dev/null
    for _ in $(seq 10); do kill -0 "$_ray_driver_pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$_ray_driver_pid" 2>/dev/null
  fi
  if [ "${RAY_STOP:-1}" = 1 ]; then
    ray stop --grace-period 5 >/dev/null 2>&1 || true
  fi
  # `ray start --block` never returns on its own; TERM to srun is forwarded to
  # it, and its handler ends that node's raylet, GCS and workers.
  local pid
  _ray_log "ending the Ray job steps (srun reports them as cancelled/killed; that is expected)"
  for pid in "${_ray_step_pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 30); do
    local left=0
    for pid in "${_ray_step_pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ $left = 0 ] && break
    sleep 0.5
  done
  for pid in "${_ray_step_pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  wait 2>/dev/null
  if [ "$rc" = 0 ]; then rm -rf "$RAY_TMP"; fi
  return "$rc"
}

_ray_on_signal() {
  # Preemption or scancel: pass the signal on to the driver, then exit through
  # the EXIT trap (143 = killed by TERM).
  _ray_log "received $1"
  [ -n "$_ray_driver_pid" ] && kill -TERM "$_ray_driver_pid" 2>/dev/null
  exit 143
}

ray_cluster_up() {
  : "${SLURM_JOB_ID:?run this under sbatch (SLURM_JOB_ID is not set)}"
  RAY_PORT=${RAY_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
  RAY_TMP=${RAY_TMP:-/tmp/ray-$SLURM_JOB_ID}
  RAY_WAIT=${RAY_WAIT:-300}
  RAY_DASHBOARD=${RAY_DASHBOARD:-false}
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
  if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    # 256 random bits, as `ray get-auth-token --generate` makes. It travels in the
    # environment (srun passes it to every step), never into a file or the log.
    RAY_AUTH_TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
    export RAY_AUTH_TOKEN
  fi
  export RAY_USAGE_STATS_ENABLED=0

  trap ray_cluster_down EXIT
  trap '_ray_on_signal TERM' TERM
  trap '_ray_on_signal INT' INT

  local nodes head head_ip n_nodes cpus
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  head=${nodes[0]}
  n_nodes=${#nodes[@]}
  cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
  local store=()
  if [ -n "${RAY_OBJECT_STORE_BYTES:-}" ]; then
    store=(--object-store-memory="$RAY_OBJECT_STORE_BYTES")
  elif [ -n "${SLURM_MEM_PER_NODE:-}" ] && [ "$SLURM_MEM_PER_NODE" -gt 0 ]; then
    store=(--object-store-memory=$((SLURM_MEM_PER_NODE * 1024 * 1024 * 3 / 10)))
  fi
  head_ip=${RAY_HEAD_IP:-$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')}
  # A node with both IPv4 and IPv6 may answer with v6 first; Ray wants [v6]:port.
  if [[ "$head_ip" == *:* ]]; then
    export RAY_ADDRESS="[$head_ip]:$RAY_PORT"
  else
    export RAY_ADDRESS="$head_ip:$RAY_PORT"
  fi
  _ray_log "job $SLURM_JOB_ID: $n_nodes node(s) (${nodes[*]}), head $head at $RAY_ADDRESS, auth ${RAY_AUTH_MODE}, temp dir $RAY_TMP"

  # shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
  srun --nodes=1 --ntasks=1 -w "$head" \
    ray start --head --block --node-ip-address="$head_ip" --port="$RAY_PORT" \
    --num-cpus="$cpus" --temp-dir="$RAY_TMP" --include-dashboard="$RAY_DASHBOARD" \
    --disable-usage-stats "${store[@]}" ${RAY_HEAD_ARGS:-} &
  _ray_step_pids+=($!)

  # Workers only after the head answers, else they give up connecting.
  local deadline=$((SECONDS + RAY_WAIT))
  until ray health-check --address "$RAY_ADDRESS" >/dev/null 2>&1; do
    if ! kill -0 "${_ray_step_pids[0]}" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
      _ray_log "error: the Ray head did not come up on $head"
      return 1
    fi
    sleep 2
  done

  if [ "$n_nodes" -gt 1 ]; then
    # One srun step over all other nodes, one task each.
    # shellcheck disable=SC2086
    srun --nodes=$((n_nodes - 1)) --ntasks=$((n_nodes - 1)) --ntasks-per-node=1 --exclude="$head" \
      ray start --block --address="$RAY_ADDRESS" --num-cpus="$cpus" --temp-dir="$RAY_TMP" \
      --disable-usage-stats "${store[@]}" ${RAY_WORKER_ARGS:-} &
    _ray_step_pids+=($!)
  fi

  # Wait for every node to register, so the driver sees the whole allocation.
  RAY_NODES=$n_nodes RAY_DEADLINE=$((deadline - SECONDS)) python - <<'PY' || return 1
import os, sys, time
import ray
want, left = int(os.environ["RAY_NODES"]), float(os.environ["RAY_DEADLINE"])
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
end = time.monotonic() + max(left, 1.0)
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want:
        break
    if time.monotonic() > end:
        sys.exit(f"error: only {len(alive)} of {want} Ray nodes joined")
    time.sleep(2)
print(f"[ray-cluster] {len(alive)} node(s) up: {ray.cluster_resources()}", file=sys.stderr)
PY
}

# Run the driver in the background and wait for it, so a TERM to the batch shell
# is handled at once (bash defers traps while a foreground child runs).
ray_run_driver() {
  "$@" &
  _ray_driver_pid=$!
  local rc=0
  wait "$_ray_driver_pid" || rc=$?
  _ray_driver_pid=""
  return $rc
}
