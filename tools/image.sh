#!/usr/bin/env bash
# Build the zostream image and smoke-test it.
#
#   tools/image.sh build [cpu|cuda]   build zostream:cpu / zostream:cuda from the Dockerfile
#   tools/image.sh smoke [cpu|cuda]   run the engine in that image and drive it from outside
#
# Engine: docker when a daemon answers, else buildah (apt-get installs buildah, podman and
# debootstrap when run as root). buildah builds on a Debian base made with debootstrap and tagged
# as the Dockerfile's FROM; the base is cached as a tarball in $ZOSTREAM_IMAGE_CACHE (default
# /var/cache/zostream-image) and rebuilt when missing. The building machine's pip settings
# (certificate bundle, local wheel folders: $PIP_CERT / $PIP_FIND_LINKS or `pip config list`)
# are mounted read-only into the build's RUN steps only.
#
# smoke: the demo model mounted read-only at /models, an API key file, a fresh /data; the server
# listens on the host network. From outside the image: health SERVING, `zostream generate` answers
# "Paris", a 3-step LoRA job SUCCEEDED, and a real Prometheus scrapes /metrics. Needs the
# project's venv ($VENV, default .venv: `make install`) and `prometheus` on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CMD=${1:-}
VARIANT=${2:-cpu}
IMAGE=${ZOSTREAM_IMAGE:-zostream:$VARIANT}
CACHE=${ZOSTREAM_IMAGE_CACHE:-/var/cache/zostream-image}
VENV=${VENV:-.venv}
BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)

log() { printf '[image %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

case "$VARIANT" in cpu | cuda) ;; *) die "variant must be cpu or cuda, not '$VARIANT'" ;; esac

have_docker() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

# ---- buildah: tools and the debootstrap base ----------------------------------------------------
need_tools() {
    local missing=()
    for t in buildah podman debootstrap; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "no docker daemon, and ${missing[*]} missing: install them (apt-get) or run as root"
    log "installing ${missing[*]} with apt-get"
    local i
    for i in 1 2 3; do  # a mirror hiccup should not fail CI
        if DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                buildah podman debootstrap >/dev/null; then
            return 0
        fi
        log "apt-get failed (try $i of 3)"
        sleep $((i * 10))
    done
    die "could not install ${missing[*]} with apt-get"
}

# Remove a debootstrap target safely: an interrupted debootstrap leaves /proc (or /sys) mounted in it.
remove_root() {
    local dir=$1 m
    [ -d "$dir" ] || return 0
    for m in $(awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$dir"
}

# Debian's base, as the official slim image: minbase, no docs/man/locales, no apt lists.
make_base_tar() {
    local tar=$1 suite=${BASE#*:} dir
    suite=${suite%-slim}
    dir=$(mktemp -d)
    trap 'remove_root "$dir"; exit 130' INT TERM
    log "debootstrap --variant=minbase $suite (once; cached in $tar)"
    local i ok=0
    for i in 1 2 3; do
        remove_root "${dir:?}/root"
        if debootstrap --variant=minbase "$suite" "$dir/root" >"$dir/log" 2>&1; then ok=1 && break; fi
        tail -5 "$dir/log" >&2
        log "debootstrap failed (try $i of 3)"
        sleep $((i * 10))
    done
    [ $ok = 1 ] || { remove_root "$dir"; die "debootstrap $suite failed"; }
    # the official image's sources: security and point-release updates too
    printf 'deb http://deb.debian.org/debian %s main\ndeb http://deb.debian.org/debian %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
        "$suite" "$suite" "$suite" >"$dir/root/etc/apt/sources.list"
    mkdir -p "$dir/root/etc/dpkg/dpkg.cfg.d"
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
        >"$dir/root/etc/dpkg/dpkg.cfg.d/slim"
    find "$dir/root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$dir"/root/usr/share/{man,info,locale}/* "$dir"/root/var/lib/apt/lists/* \
        "$dir"/root/var/cache/apt/archives/*.deb "$dir"/root/var/log/*.log
    mkdir -p "$(dirname "$tar")"
    tar -C "$dir/root" --one-file-system --numeric-owner -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
    remove_root "$dir"
    trap - INT TERM
}

# debian:bookworm-slim -> docker.io/library/debian:bookworm-slim, the name a FROM line resolves to
full_name() {
    local n=$1 first=${1%%/*}
    if [[ $n != */* ]]; then
        n=docker.io/library/$n
    elif [[ $first != *.* && $first != *:* && $first != localhost ]]; then
        n=docker.io/$n
    fi
    printf '%s' "$n"
}

ensure_base() {
    if buildah inspect --type image "$BASE" >/dev/null 2>&1; then
        log "base $BASE: present"
        return 0
    fi
    local tar="$CACHE/${BASE//[:\/]/_}.tar"
    [ -s "$tar" ] || make_base_tar "$tar"
    log "importing $tar as $BASE"
    podman import "$tar" "$(full_name "$BASE")" >/dev/null || {
        rm -f "$tar"  # a damaged cache must not fail every later run
        die "podman import of $tar failed (cache removed; run again)"
    }
}

# pip's setting NAME from the environment or `pip config list` (global or env scope).
pip_setting() {
    local env_name=$1 key=$2 val
    val=${!env_name:-}
    if [ -z "$val" ]; then
        val=$(python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:]*\.$key='\(.*\)'$/\1/p" | head -1)
    fi
    printf '%s' "$val"
}

build() {
    local args=(--build-arg "TORCH_VARIANT=$VARIANT" -t "$IMAGE" -f Dockerfile)
    if have_docker; then
        log "docker build $IMAGE"
        docker build "${args[@]}" .
        return
    fi
    need_tools
    ensure_base
    local vols=() cert links dirs=() d n=0
    cert=$(pip_setting PIP_CERT cert)
    [ -n "$cert" ] || cert=${SSL_CERT_FILE:-}
    if [ -n "$cert" ] && [ -f "$cert" ]; then
        vols+=(--volume "$cert:/run/build-ca.crt:ro") && args+=(--build-arg BUILD_PIP_CERT=/run/build-ca.crt)
    fi
    links=$(pip_setting PIP_FIND_LINKS find-links)
    for d in $links; do
        d=${d#file://}
        [ -d "$d" ] || continue
        vols+=(--volume "$d:/run/build-wheels/$n:ro") && dirs+=("/run/build-wheels/$n") && n=$((n + 1))
    done
    [ ${#dirs[@]} -eq 0 ] || args+=(--build-arg "BUILD_PIP_FIND_LINKS=${dirs[*]}")
    log "buildah bud $IMAGE (cert: ${cert:-none}; wheel folders: ${links:-none})"
    # twice at most: a network hiccup (apt or PyPI) should not fail CI; the second try reuses the layers
    buildah bud --isolation chroot --network host --pull=never --layers --format docker "${vols[@]}" "${args[@]}" . \
        || { log "buildah bud failed; retrying once"; sleep 10; \
            buildah bud --isolation chroot --network host --pull=never --layers --format docker "${vols[@]}" "${args[@]}" .; }
}

# ---- smoke ---------------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

SERVER_PID="" CTR="" PROM_PID="" WORK=""
cleanup() {
    local rc=$?
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    [ -z "$PROM_PID" ] || kill -TERM "$PROM_PID" 2>/dev/null || true
    if [ -n "$CTR" ]; then
        if have_docker; then docker rm -f "$CTR" >/dev/null 2>&1 || true; else buildah rm "$CTR" >/dev/null 2>&1 || true; fi
    fi
    if [ $rc -ne 0 ] && [ -n "$WORK" ] && [ -f "$WORK/server.log" ]; then
        log "server output (last 60 lines):"
        tail -n 60 "$WORK/server.log" >&2
    fi
    [ -z "$WORK" ] || { chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"; }
    return $rc
}

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 2 s until it succeeds
wait_for() {
    local secs=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ -z "$SERVER_PID" ] || kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited while waiting for $what"
        ! grep -q "engine failed to start" "$WORK/server.log" 2>/dev/null || die "the engine failed to start"
        [ $((SECONDS - t0)) -lt "$secs" ] || die "$what: not after $secs s"
        sleep 2
    done
    log "$what (after $((SECONDS - t0)) s)"
}

# image_config KEY: one item per line of the image's config KEY (Entrypoint, Healthcheck.Test)
image_config() {
    local raw
    if have_docker; then raw=$(docker image inspect "$IMAGE"); else raw=$(buildah inspect --type image "$IMAGE"); fi
    python3 -c '
import json, sys
d = json.loads(sys.argv[1])
cfg = d[0]["Config"] if isinstance(d, list) else d["Docker"]["config"]
for key in sys.argv[2].split("."):
    cfg = (cfg or {}).get(key)
print("\n".join(cfg or []))' "$raw" "$1"
}

smoke() {
    local zs="$VENV/bin/zostream" py="$VENV/bin/python" model port mport pport key entry
    [ -x "$zs" ] || die "$zs missing: run make install first (the smoke test drives the image from outside)"
    command -v prometheus >/dev/null 2>&1 || die "prometheus is not on PATH (Debian: apt-get install prometheus)"
    model=$("$zs" model fetch-demo | tail -n 1)
    [ -f "$model/config.json" ] || die "no demo model at '$model'"
    WORK=$(mktemp -d)
    trap cleanup EXIT
    # The image's user (uid 10001) must be able to read the model: a copy readable by all, as a
    # deployment's model folder must be (the cached demo's safetensors may be private to its owner).
    cp -r "$model" "$WORK/model"
    chmod -R a+rX,a-w "$WORK/model"
    model="$WORK/model"
    mkdir -p "$WORK/data" "$WORK/prom"
    chmod 0777 "$WORK/data"  # the image's user (uid 10001) writes its state here
    key="$WORK/api-key"
    python3 -c 'import secrets; print(secrets.token_hex(24))' >"$key"
    chmod 0444 "$key"
    port=$(free_port) && mport=$(free_port) && pport=$(free_port) && hport=$(free_port)
    # the image's own ENTRYPOINT, with what compose adds (the API key) and free ports (host network)
    local extra=(--api-key-file /run/secrets/zostream_api_key --port "$port" --metrics-port "$mport"
        --http-port "$hport")
    local mounts=(-v "$model:/models:ro" -v "$WORK/data:/data" -v "$key:/run/secrets/zostream_api_key:ro")
    if have_docker; then
        CTR=zostream-smoke-$$
        docker run -d --name "$CTR" --network host "${mounts[@]}" "$IMAGE" "${extra[@]}" >/dev/null
        docker logs -f "$CTR" >"$WORK/server.log" 2>&1 &
        SERVER_PID=$!
    else
        CTR=$(buildah from --pull-never "$IMAGE")
        mapfile -t entry < <(image_config Entrypoint)
        [ "${entry[0]:-}" = zostream ] || die "unexpected ENTRYPOINT: ${entry[*]}"
        buildah run --isolation chroot --network host "${mounts[@]}" "$CTR" -- "${entry[@]}" "${extra[@]}" \
            >"$WORK/server.log" 2>&1 &
        SERVER_PID=$!
    fi
    log "server starting in $IMAGE: gRPC 127.0.0.1:$port, /metrics :$mport"

    # 1. health SERVING: from outside, then the image's own HEALTHCHECK command inside the image
    local hc
    mapfile -t hc < <(image_config Healthcheck.Test)
    [ "${hc[0]:-}" = CMD ] || die "the image has no HEALTHCHECK [\"CMD\", ...] (got: ${hc[*]:-nothing})"
    hc=("${hc[@]:1}")
    hc=("${hc[@]/127.0.0.1:50051/127.0.0.1:$port}")
    wait_for 300 "health SERVING (outside)" "$py" -m zostream.server.healthcheck "127.0.0.1:$port"
    if have_docker; then
        docker exec "$CTR" "${hc[@]}" || die "the image's HEALTHCHECK failed inside the container"
    else
        buildah run --isolation chroot --network host "$CTR" -- "${hc[@]}" \
            || die "the image's HEALTHCHECK failed inside the image"
    fi
    log "health SERVING (the image's HEALTHCHECK command, inside)"

    # 2. the API key is required; Generate answers "Paris" with it
    if "$zs" generate --server "127.0.0.1:$port" --timeout 60 "Hello" >"$WORK/unauth.txt" 2>&1; then
        die "a Generate without the API key succeeded"
    fi
    grep -q UNAUTHENTICATED "$WORK/unauth.txt" || die "no UNAUTHENTICATED without the key: $(cat "$WORK/unauth.txt")"
    "$zs" generate --server "127.0.0.1:$port" --api-key-file "$key" --timeout 300 \
        --chat "What is the capital of France?" | tee "$WORK/answer.txt"
    grep -q Paris "$WORK/answer.txt" || die "the answer does not say Paris"
    log "Generate: Paris"

    # 2b. the OpenAI-compatible HTTP API: 401 without the key, the model listed with it
    "$py" - "$hport" "$key" <<'PY' || die "the HTTP API did not answer as expected"
import json, sys, urllib.error, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/v1/models"
try:
    urllib.request.urlopen(url, timeout=30)
    sys.exit("GET /v1/models without the key succeeded")
except urllib.error.HTTPError as err:
    assert err.code == 401, err.code
key = open(sys.argv[2]).read().strip()
req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
with urllib.request.urlopen(req, timeout=30) as r:
    assert json.load(r)["data"], "no model listed"
PY
    log "HTTP API: 401 without the key, /v1/models with it"

    # 3. a 3-step LoRA job SUCCEEDED (jobs create --follow exits 0 only then)
    "$py" - "$WORK/train.jsonl" <<'PY'
import json, sys
rows = [("The capital of France is", " Paris."), ("The capital of Italy is", " Rome."),
        ("The capital of Spain is", " Madrid."), ("The capital of Japan is", " Tokyo.")]
with open(sys.argv[1], "w") as f:
    for p, c in rows:
        f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
PY
    "$zs" jobs create --server "127.0.0.1:$port" --api-key-file "$key" --timeout 600 --method lora \
        --data "$WORK/train.jsonl" --steps 3 --batch-size 2 --seed 1 --follow >"$WORK/job.txt" \
        || { cat "$WORK/job.txt" >&2; die "the LoRA job did not succeed"; }
    log "LoRA job: 3 steps, SUCCEEDED"

    # 4. a real Prometheus scrapes /metrics
    printf 'global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: zostream\n    static_configs:\n      - targets: ["127.0.0.1:%s"]\n' \
        "$mport" >"$WORK/prometheus.yml"
    prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prom" \
        --web.listen-address="127.0.0.1:$pport" >"$WORK/prometheus.log" 2>&1 &
    PROM_PID=$!
    cat >"$WORK/query.py" <<'PY'
import json, sys, urllib.parse, urllib.request
q = urllib.parse.quote('sum(zostream_finetune_steps_total) >= 3 and on() up{job="zostream"} == 1')
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/v1/query?query={q}", timeout=5) as r:
    sys.exit(0 if json.load(r)["data"]["result"] else 1)
PY
    wait_for 120 "Prometheus scraped zostream_finetune_steps_total >= 3" "$py" "$WORK/query.py" "$pport"
    log "smoke test passed"
}

# The whole script is parsed before anything runs (main at the end): editing this file while a
# build runs cannot change what the running build does.
main() {
    case "$CMD" in
        build)
            t0=$SECONDS
            build
            log "built $IMAGE in $((SECONDS - t0)) s"
            ;;
        smoke)
            t0=$SECONDS
            smoke
            log "smoke test of $IMAGE in $((SECONDS - t0)) s"
            ;;
        *)
            die "usage: tools/image.sh build|smoke [cpu|cuda]"
            ;;
    esac
}

main "$@"; exit $?
