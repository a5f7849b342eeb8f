#!/usr/bin/env bash
# Creates the distill work pools on the Prefect server at $PREFECT_API_URL (when missing) and
# sets the gpu pool's concurrency limit. Idempotent: run it again at any time.
#
#   infra/setup-pools.sh                        # cpu (process) + gpu (docker)
#   DISTILL_GPU_POOL_TYPE=kubernetes infra/setup-pools.sh
#   infra/setup-pools.sh --update-templates     # also push the JSON templates to existing pools
#
#   pool  type                         base job template
#   cpu   process                      work-pools/process-cpu.json
#   gpu   docker (or kubernetes)       work-pools/docker-gpu.json (or kubernetes-gpu.json)
#
# The gpu pool gets a work-pool concurrency limit of DISTILL_GPU_CONCURRENCY (default 1): at
# most that many distill-train/gpu flow runs are pending or running at once, scheduled and
# manual ones together; the rest wait in the pool (state Scheduled/Late) until a slot frees.
# One run claims every GPU of the host by default (docker template: gpu_count -1), hence 1.
# The cpu pool stays unlimited (its runs are orchestrators that wait on gpu runs).
#
# Environment: PREFECT_API_URL (required unless set in the active Prefect profile),
# DISTILL_GPU_CONCURRENCY, DISTILL_GPU_POOL_TYPE (docker | kubernetes), DISTILL_IMAGE (the gpu pool's
# default image, e.g. distill:<commit>; with --update-templates it replaces the pool's),
# DISTILL_WORK_POOLS_DIR (default: the work-pools folder next to this script),
# PREFECT (the prefect command; default: prefect).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
templates="${DISTILL_WORK_POOLS_DIR:-$here/work-pools}"
prefect="${PREFECT:-prefect}"
gpu_type="${DISTILL_GPU_POOL_TYPE:-docker}"
gpu_limit="${DISTILL_GPU_CONCURRENCY:-1}"

update=0
case "${1:-}" in
    "") ;;
    --update-templates) update=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--update-templates]" >&2; exit 2 ;;
esac

if ! [[ "$gpu_limit" =~ ^[1-9][0-9]*$ ]]; then
    echo "DISTILL_GPU_CONCURRENCY must be a positive integer, got '$gpu_limit'" >&2
    exit 2
fi
case "$gpu_type" in
    docker) gpu_template="$templates/docker-gpu.json" ;;
    kubernetes) gpu_template="$templates/kubernetes-gpu.json" ;;
    *) echo "DISTILL_GPU_POOL_TYPE must be docker or kubernetes, got '$gpu_type'" >&2; exit 2 ;;
esac

ensure_pool() {  # NAME TYPE TEMPLATE
    local name="$1" type="$2" template="$3" existing
    if [[ ! -f "$template" ]]; then
        echo "no base job template $template" >&2
        return 1
    fi
    if existing="$("$prefect" --no-prompt work-pool inspect "$name" --output json 2>/dev/null)"; then
        local have
        have="$(printf '%s' "$existing" | python3 -c 'import json, sys; print(json.load(sys.stdin)["type"])')"
        if [[ "$have" != "$type" ]]; then
            echo "warning: work pool $name exists with type $have, not $type; left as it is" >&2
        elif (( update )); then
            "$prefect" --no-prompt work-pool update "$name" --base-job-template "$template"
        else
            echo "work pool $name ($type) exists; base job template left as it is (--update-templates replaces it)"
        fi
    elif ! "$prefect" --no-prompt work-pool create "$name" --type "$type" --base-job-template "$template"; then
        # lost a race with a worker that created the pool meanwhile (compose starts both at once)?
        "$prefect" --no-prompt work-pool inspect "$name" >/dev/null 2>&1 || return 1
        echo "work pool $name was created meanwhile; base job template left as it is" >&2
    fi
}

if [[ -n "${DISTILL_IMAGE:-}" ]]; then  # pin the image the gpu pool runs (e.g. distill:<commit>)
    pinned="$(mktemp)"
    trap 'rm -f "$pinned"' EXIT
    DISTILL_IMAGE="$DISTILL_IMAGE" python3 -c 'import json, os, sys
t = json.load(open(sys.argv[1]))
t["variables"]["properties"]["image"]["default"] = os.environ["DISTILL_IMAGE"]
print(json.dumps(t, indent=2))' "$gpu_template" > "$pinned"
    gpu_template="$pinned"
fi

ensure_pool cpu process "$templates/process-cpu.json"
ensure_pool gpu "$gpu_type" "$gpu_template"
"$prefect" --no-prompt work-pool set-concurrency-limit gpu "$gpu_limit"
echo "work pools ready: cpu (unlimited), gpu (concurrency limit $gpu_limit)"
