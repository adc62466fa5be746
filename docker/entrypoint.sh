#!/bin/sh
# The worker image's entry point: make NEON_ROOT a checkout of the Neon pipeline, then run the command
# (by default `neon schedule worker --healthcheck`: a Prefect process worker on the pool `neon`) in it.
#
#   NEON_ROOT           the checkout (default /work/neon; keep it on a volume: DVC's cache and the stages'
#                       own caches live in it and make the next run's unchanged stages hits)
#   NEON_REPO_URL       clone this repository into NEON_ROOT when there is no checkout there yet, and follow
#                       NEON_REPO_BRANCH (default main) at each start; unset: NEON_ROOT must be a checkout
#                       already (a bind mount), used as it is
#   AWS_ENDPOINT_URL_S3 written to the checkout's DVC remote (.dvc/config.local, machine-local) as its
#                       endpoint; NEON_DVC_REMOTE_URL likewise as its url (e.g. s3://bucket/dvc). Credentials
#                       are never written: DVC, s3fs and Prefect read AWS_ACCESS_KEY_ID/SECRET from the env.
#
#   entrypoint.sh --check [COMMAND...]   does all of the above, then prints the command instead of running it
set -eu

check=0
if [ "${1:-}" = "--check" ]; then
    check=1
    shift
fi
[ "$#" -gt 0 ] || set -- neon schedule worker --healthcheck

NEON_ROOT="${NEON_ROOT:-/work/neon}"
branch="${NEON_REPO_BRANCH:-main}"
say() { echo "entrypoint: $*"; }
fail() { echo "entrypoint: error: $*" >&2; exit 2; }

git config --global --get-all safe.directory 2>/dev/null | grep -qxF "$NEON_ROOT" \
    || git config --global --add safe.directory "$NEON_ROOT"  # a bind mount may belong to another uid

if [ -e "$NEON_ROOT/.git" ]; then
    if [ -n "${NEON_REPO_URL:-}" ]; then
        origin="$(git -C "$NEON_ROOT" remote get-url origin 2>/dev/null || true)"
        [ "$origin" = "$NEON_REPO_URL" ] \
            || fail "$NEON_ROOT is a checkout of '$origin', not of NEON_REPO_URL=$NEON_REPO_URL"
        git -C "$NEON_ROOT" fetch --quiet origin "$branch"
        if [ "$(git -C "$NEON_ROOT" rev-parse --abbrev-ref HEAD)" != "$branch" ]; then
            git -C "$NEON_ROOT" checkout --quiet "$branch"
        fi
        git -C "$NEON_ROOT" merge --ff-only --quiet "origin/$branch" \
            || fail "$NEON_ROOT has local commits or changes that do not fast-forward to origin/$branch"
        say "checkout $NEON_ROOT at origin/$branch $(git -C "$NEON_ROOT" rev-parse --short HEAD)"
    else
        say "using the checkout at $NEON_ROOT as it is ($(git -C "$NEON_ROOT" rev-parse --short HEAD))"
    fi
elif [ -n "${NEON_REPO_URL:-}" ]; then
    mkdir -p "$(dirname "$NEON_ROOT")"
    git clone --quiet --branch "$branch" "$NEON_REPO_URL" "$NEON_ROOT"
    say "cloned $NEON_REPO_URL ($branch) into $NEON_ROOT at $(git -C "$NEON_ROOT" rev-parse --short HEAD)"
else
    fail "no checkout at NEON_ROOT=$NEON_ROOT and no NEON_REPO_URL to clone one from (mount a checkout there or set it)"
fi
[ -f "$NEON_ROOT/dvc.yaml" ] || fail "$NEON_ROOT holds no dvc.yaml: not a checkout of the Neon pipeline"

cd "$NEON_ROOT"
if [ -n "${NEON_DVC_REMOTE_URL:-}" ]; then
    dvc remote modify --local store url "$NEON_DVC_REMOTE_URL"
fi
if [ -n "${AWS_ENDPOINT_URL_S3:-}" ]; then
    # the default remote, the experiments' (README, "Experiments") and each tracked input's bucket (`neon track`)
    for remote in store exps $(dvc remote list | awk '$1 ~ /^input-/ {print $1}'); do
        dvc remote modify --local "$remote" endpointurl "$AWS_ENDPOINT_URL_S3"
    done
fi

# The checkout's own code comes first (flows/, stages/, models/), over the copy installed in the image.
export NEON_ROOT
export PYTHONPATH="$NEON_ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$check" = 1 ]; then
    say "would run in $NEON_ROOT: $*"
    exit 0
fi
exec "$@"
