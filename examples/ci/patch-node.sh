#!/bin/sh
# A generic CI / job-runner step (Jenkins, Rundeck, GitLab CI): patch one node with your own
# patch tool, nodepatch doing everything around it, chained by nodepatch's exit codes.
#
#   patch-node.sh CLUSTER NODE PATCH-COMMAND [ARGS...]      (the node's name is appended)
#
# Environment: NODEPATCH (default: nodepatch; e.g. "/opt/nodepatch/.venv/bin/nodepatch"), and
# NODEPATCH_CONFIG / NODEPATCH_DATABASE_URL / secrets as for any nodepatch command.
# Exit: 0 done, 5 done but some VMs were not put back (see the warnings), 1 failed or refused
# (nothing left half-done that `nodepatch status` does not show), 3 stopped before the end
# (continue with `nodepatch resume RUN`), 4 busy (try again later), 2 usage.
set -u

NODEPATCH=${NODEPATCH:-nodepatch}
if [ $# -lt 3 ]; then
    echo "usage: $0 CLUSTER NODE PATCH-COMMAND [ARGS...]" >&2
    exit 2
fi
cluster=$1
node=$2
shift 2

run_id_of() {  # the run_id field of a --json document on stdin
    sed -n 's/^  "run_id": "\([^"]*\)",*$/\1/p' | head -n 1
}

# 1. The pre-patch half: preflight and drain, stopping on entering Patching.
out=$($NODEPATCH start --cluster "$cluster" --node "$node" --until Patching --json)
code=$?
run_id=$(printf '%s\n' "$out" | run_id_of)
case $code in
    3) echo "nodepatch: $node drained (run $run_id); patching" ;;
    1) echo "nodepatch: refused or failed before patching:" >&2
       [ -n "$run_id" ] && $NODEPATCH status "$run_id" >&2
       exit 1 ;;
    4) echo "nodepatch: $node is busy (another run holds it); try again later" >&2
       exit 4 ;;
    *) echo "nodepatch start exited $code" >&2
       exit "$code" ;;
esac

# 2. Hand over to the external patch tool.
if ! "$@" "$node"; then
    echo "nodepatch: the patch tool failed on $node; aborting run $run_id (node back, VMs back)" >&2
    $NODEPATCH abort "$run_id" >&2
    exit 1
fi

# 3. Tell nodepatch the node is patched, then run the post-patch half.
$NODEPATCH signal "$run_id" patched || exit $?
$NODEPATCH resume "$run_id" --json >/dev/null
code=$?
case $code in
    0) echo "nodepatch: $node patched, every VM back (run $run_id)" ;;
    5) echo "nodepatch: $node patched, but some VMs were not put back (run $run_id):" >&2
       $NODEPATCH status "$run_id" | grep '^not put back' >&2 ;;
    3) echo "nodepatch: run $run_id stopped before the end; continue with: nodepatch resume $run_id" >&2 ;;
    4) echo "nodepatch: run $run_id is held by another process; try again later" >&2 ;;
    *) echo "nodepatch: run $run_id failed after patching (exit $code):" >&2
       $NODEPATCH status "$run_id" >&2 ;;
esac
exit "$code"
