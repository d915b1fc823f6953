#!/usr/bin/env bash
# A real, tiny Kubernetes control plane for the cluster test tier: etcd + kube-apiserver +
# kube-controller-manager (garbage collector, namespace and service-account controllers) on
# 127.0.0.1. No kubelet, no Docker, no binary downloads: kube 1.20.2 is built from Debian bookworm's
# `kubernetes` source package with Debian's Go, once, into a cache outside the repository.
#
#   hack/test-cluster.sh up      build if needed, start, wait until healthy; prints shell lines
#   hack/test-cluster.sh down    stop everything started by `up` and delete its data
#   hack/test-cluster.sh build   only build (and cache) the binaries
#   hack/test-cluster.sh status  print whether it runs (exit 0) or not (exit 1)
#
# `up` is meant to be sourced: `source <(hack/test-cluster.sh up)`. Its stdout carries ONLY shell lines
# (`export KUBECONFIG=...`), progress goes to stderr. Where the cluster cannot be built or started it
# prints `export DLLM_TEST_CLUSTER_UNAVAILABLE="<reason>"` and exits 0, so tests can skip loudly (and
# fail under CI=true). `up` is idempotent: a healthy running cluster is reused.
#
# Settings (environment):
#   DLLM_CACHE_DIR            build cache (default $HOME/.cache/dllm-serve)
#   DLLM_TEST_CLUSTER_DIR     runtime state: certs, etcd data, logs, pids, kubeconfig
#                             (default ${TMPDIR:-/tmp}/dllm-test-cluster-$UID)
#   DLLM_TEST_CLUSTER_TIMEOUT seconds to wait for health (default 120)
#   DLLM_TEST_CLUSTER_NO_BUILD=1  never build; report unavailable when the binaries are missing
set -uo pipefail

KUBE_VERSION=1.20.2
# Bump when the patches applied before building change: cached binaries of another revision are rebuilt.
BUILD_REV=2
CACHE_DIR=${DLLM_CACHE_DIR:-$HOME/.cache/dllm-serve}
KUBE_DIR=$CACHE_DIR/kube-$KUBE_VERSION
BIN_DIR=$KUBE_DIR/bin
STATE_DIR=${DLLM_TEST_CLUSTER_DIR:-${TMPDIR:-/tmp}/dllm-test-cluster-$(id -u)}
TIMEOUT=${DLLM_TEST_CLUSTER_TIMEOUT:-120}
APT_LOCK_TIMEOUT=900

log() { echo "test-cluster: $*" >&2; }

unavailable() {
    # One shell line on stdout; the reason is kept free of quotes so it survives `source`.
    local reason=${1//\"/\'}
    log "UNAVAILABLE: $reason"
    echo "export DLLM_TEST_CLUSTER_UNAVAILABLE=\"$reason\""
    exit 0
}

have_binaries() {
    [[ -x $BIN_DIR/kube-apiserver && -x $BIN_DIR/kube-controller-manager ]] && command -v etcd >/dev/null \
        && [[ $(cat "$BIN_DIR/.build-rev" 2>/dev/null) == "$BUILD_REV" ]]
}

apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT -q "$@"
}

ensure_build_deps() {
    local need=()
    command -v go >/dev/null || need+=(golang-go)
    command -v dpkg-source >/dev/null || need+=(dpkg-dev)
    command -v rsync >/dev/null || need+=(rsync)
    command -v jq >/dev/null || need+=(jq)
    command -v etcd >/dev/null || need+=(etcd-server)
    command -v openssl >/dev/null || need+=(openssl)
    command -v curl >/dev/null || need+=(curl)
    [[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ]] || need+=(golang-github-modern-go-reflect2-dev)
    # deb-src is needed for `apt-get source kubernetes`.
    local src_list=/etc/apt/sources.list.d/dllm-deb-src.sources
    local need_src=0
    if ! grep -rqs '^Types:.*deb-src\|^deb-src ' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        need_src=1
    fi
    [[ ${#need[@]} -eq 0 && $need_src -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || { echo "not root: cannot install ${need[*]} deb-src"; return 1; }
    command -v apt-get >/dev/null || { echo "no apt-get: cannot install ${need[*]}"; return 1; }
    if [[ $need_src -eq 1 ]]; then
        log "adding a deb-src entry ($src_list)"
        cat >"$src_list" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    log "apt-get install ${need[*]:-}"
    apt_get update >&2 || { echo "apt-get update failed"; return 1; }
    if [[ ${#need[@]} -gt 0 ]]; then
        apt_get install -y --no-install-recommends "${need[@]}" >&2 || { echo "apt-get install ${need[*]} failed"; return 1; }
    fi
}

# Builds kube-apiserver and kube-controller-manager into $BIN_DIR. Prints a reason and returns 1 on failure.
build() {
    have_binaries && return 0
    local why
    why=$(ensure_build_deps) || { echo "${why:-build dependencies missing}"; return 1; }
    have_binaries && return 0   # only a runtime dependency (etcd) was missing
    mkdir -p "$KUBE_DIR" || { echo "cannot create $KUBE_DIR"; return 1; }
    # One build at a time (two `up`s in parallel would otherwise both compile).
    exec 9>"$KUBE_DIR/.build.lock"
    flock 9
    have_binaries && return 0
    local src=$KUBE_DIR/src
    if [[ ! -f $src/.unpacked ]]; then
        log "fetching Debian's kubernetes source package into $src"
        rm -rf "$src" && mkdir -p "$src"
        (cd "$src" && apt-get source -q kubernetes >&2) || { echo "apt-get source kubernetes failed"; return 1; }
        touch "$src/.unpacked"
    fi
    local tree
    tree=$(find "$src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
    [[ -n $tree && -f $tree/Makefile ]] || { echo "no kubernetes source tree under $src"; return 1; }
    # kube 1.20 vendors modern-go/reflect2 v1.0.1, which crashes under Go >= 1.18 on the first custom
    # object create (unsafe map iteration); Debian's 1.0.2 is API-compatible and fixed.
    log "replacing vendored modern-go/reflect2 with Debian's 1.0.2"
    rm -rf "$tree/vendor/github.com/modern-go/reflect2"
    mkdir -p "$tree/vendor/github.com/modern-go/reflect2"
    cp -rL /usr/share/gocode/src/github.com/modern-go/reflect2/. "$tree/vendor/github.com/modern-go/reflect2/"
    rm -rf "$tree/vendor/github.com/modern-go/reflect2/"*_test.go
    # go-openapi's type validator treats a value as null when reflect.DeepEqual(reflect.Zero(T),
    # reflect.ValueOf(v)) - comparing reflect.Value headers, which under Go >= 1.19 share the runtime's
    # zero buffer, so "" in any custom resource is rejected as "must be of type string: null". Under
    # the Go it was written for this was only ever true for nil; restore exactly that.
    local f
    for f in "$tree/vendor/github.com/go-openapi/validate/type.go" \
             "$tree/vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go"; do
        [[ -f $f ]] || continue
        sed -i 's/data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))/data == nil/' "$f"
        grep -q 'reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data))' "$f" && { echo "patching $f failed"; return 1; }
    done
    sed -i 's#^\(github.com/modern-go/reflect2 \)v1\.0\.1$#\1v1.0.2#; s#^\(\# github.com/modern-go/reflect2 \)v1\.0\.1$#\1v1.0.2#' \
        "$tree/vendor/modules.txt" 2>/dev/null || true
    local target
    for target in kube-apiserver kube-controller-manager; do
        log "building $target (several minutes on 2 cores)"
        (cd "$tree" && GOFLAGS=-mod=vendor GO111MODULE=on GOTOOLCHAIN=local \
            KUBE_GIT_VERSION=v$KUBE_VERSION KUBE_GIT_TREE_STATE=clean \
            make WHAT=cmd/$target >&2) || { echo "make WHAT=cmd/$target failed (see stderr)"; return 1; }
    done
    mkdir -p "$BIN_DIR"
    for target in kube-apiserver kube-controller-manager; do
        local built
        built=$(find "$tree/_output" -type f -name "$target" -perm -u+x | head -n1)
        [[ -n $built ]] || { echo "$target binary not found after build"; return 1; }
        install -m 0755 "$built" "$BIN_DIR/$target"
    done
    echo "$BUILD_REV" >"$BIN_DIR/.build-rev"
    log "built into $BIN_DIR"
    # The source tree and Go build cache are large and no longer needed.
    rm -rf "$src" "$tree/_output"
    return 0
}

free_port() {
    python3 - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

healthy() {
    [[ -f $STATE_DIR/kubeconfig && -f $STATE_DIR/apiserver.port ]] || return 1
    pid_alive "$STATE_DIR/etcd.pid" && pid_alive "$STATE_DIR/kube-apiserver.pid" \
        && pid_alive "$STATE_DIR/kube-controller-manager.pid" || return 1
    curl -fsS --max-time 5 --cacert "$STATE_DIR/pki/ca.crt" --cert "$STATE_DIR/pki/admin.crt" \
        --key "$STATE_DIR/pki/admin.key" "https://127.0.0.1:$(cat "$STATE_DIR/apiserver.port")/readyz" \
        >/dev/null 2>&1
}

make_pki() {
    local d=$STATE_DIR/pki
    mkdir -p "$d"
    (
        cd "$d" || exit 1
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt \
            -subj "/CN=dllm-test-cluster-ca" 2>/dev/null || exit 1
        cat >apiserver.ext <<'EOF'
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth
EOF
        openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
            -subj "/CN=kube-apiserver" 2>/dev/null || exit 1
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile apiserver.ext -out apiserver.crt 2>/dev/null || exit 1
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        # system:masters: the test user (operator tests create CRDs, RBAC, namespaces).
        openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr \
            -subj "/O=system:masters/CN=dllm-test-admin" 2>/dev/null || exit 1
        openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile client.ext -out admin.crt 2>/dev/null || exit 1
        openssl genrsa -out sa.key 2048 2>/dev/null || exit 1
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null || exit 1
    )
}

write_kubeconfig() {
    local port=$1 out=$2
    local ca cert key
    ca=$(base64 -w0 <"$STATE_DIR/pki/ca.crt")
    cert=$(base64 -w0 <"$STATE_DIR/pki/admin.crt")
    key=$(base64 -w0 <"$STATE_DIR/pki/admin.key")
    cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: dllm-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $ca
users:
- name: dllm-test-admin
  user:
    client-certificate-data: $cert
    client-key-data: $key
contexts:
- name: dllm-test
  context: {cluster: dllm-test, user: dllm-test-admin, namespace: default}
current-context: dllm-test
EOF
    chmod 600 "$out"
}

start_bg() {
    # start_bg NAME CMD...: detached (own session) so it outlives the sourcing shell; logs in STATE_DIR.
    local name=$1; shift
    setsid "$@" >"$STATE_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/$name.pid"
}

stop_pid() {
    local f=$1
    [[ -f $f ]] || return 0
    local pid
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

down() {
    local n
    for n in kube-controller-manager kube-apiserver etcd; do stop_pid "$STATE_DIR/$n.pid"; done
    [[ -d $STATE_DIR ]] && rm -rf "$STATE_DIR"
    log "stopped"
}

wait_for() {
    # wait_for WHAT LOGNAME PIDFILE CMD...
    local what=$1 logname=$2 pidfile=$3; shift 3
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ! pid_alive "$pidfile"; then
            tail -n 20 "$STATE_DIR/$logname.log" >&2
            echo "$what exited (log: $STATE_DIR/$logname.log)"
            return 1
        fi
        if ((SECONDS > deadline)); then
            tail -n 20 "$STATE_DIR/$logname.log" >&2
            echo "$what not healthy after ${TIMEOUT}s (log: $STATE_DIR/$logname.log)"
            return 1
        fi
        sleep 0.5
    done
}

start() {
    mkdir -p "$STATE_DIR" && chmod 700 "$STATE_DIR"
    make_pki || { echo "openssl failed to create certificates"; return 1; }
    local etcd_port etcd_peer api_port kcm_port
    etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port); kcm_port=$(free_port)
    log "starting etcd on 127.0.0.1:$etcd_port"
    start_bg etcd etcd --name dllm-test --data-dir "$STATE_DIR/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" \
        --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "dllm-test=http://127.0.0.1:$etcd_peer" \
        --listen-metrics-urls "" --log-level warn
    wait_for etcd etcd "$STATE_DIR/etcd.pid" curl -fsS "http://127.0.0.1:$etcd_port/health" || return 1

    local pki=$STATE_DIR/pki
    log "starting kube-apiserver on https://127.0.0.1:$api_port"
    # --insecure-port=0: 1.20 would otherwise bind the plain-HTTP port 8080 (our model server's port).
    # Admission: the 1.20 default set (NamespaceLifecycle, LimitRanger, ServiceAccount, DefaultStorageClass,
    # ResourceQuota, webhooks, ...) plus NodeRestriction is left implicit; nothing is disabled.
    start_bg kube-apiserver "$BIN_DIR/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
        --secure-port "$api_port" --insecure-port 0 \
        --cert-dir "$pki" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
        --client-ca-file "$pki/ca.crt" \
        --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --api-audiences https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range 10.0.0.0/24 \
        --authorization-mode RBAC --allow-privileged=true \
        --enable-admission-plugins NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota \
        --profiling=false --v=1
    echo "$api_port" >"$STATE_DIR/apiserver.port"
    write_kubeconfig "$api_port" "$STATE_DIR/kubeconfig"
    wait_for kube-apiserver kube-apiserver "$STATE_DIR/kube-apiserver.pid" \
        curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
        "https://127.0.0.1:$api_port/readyz" || return 1

    log "starting kube-controller-manager"
    start_bg kube-controller-manager "$BIN_DIR/kube-controller-manager" \
        --kubeconfig "$STATE_DIR/kubeconfig" \
        --authentication-kubeconfig "$STATE_DIR/kubeconfig" \
        --authorization-kubeconfig "$STATE_DIR/kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$kcm_port" --port 0 \
        --cert-dir "$pki/kcm" \
        --leader-elect=false \
        --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
        --use-service-account-credentials=false \
        --controllers '*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,-pvc-protection,-pv-protection,-csrsigning,-csrapproving,-bootstrapsigner,-tokencleaner,-ttl' \
        --v=1
    wait_for kube-controller-manager kube-controller-manager "$STATE_DIR/kube-controller-manager.pid" \
        curl -fsSk "https://127.0.0.1:$kcm_port/healthz" || return 1
    # The namespace controller and the service-account controller need a moment; wait for `default`'s SA.
    local deadline=$((SECONDS + TIMEOUT))
    until curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
        "https://127.0.0.1:$api_port/api/v1/namespaces/default/serviceaccounts/default" >/dev/null 2>&1; do
        ((SECONDS > deadline)) && { echo "default ServiceAccount never appeared (controller-manager)"; return 1; }
        sleep 0.5
    done
    return 0
}

up() {
    if healthy; then
        log "already running ($STATE_DIR)"
        echo "export KUBECONFIG=\"$STATE_DIR/kubeconfig\""
        exit 0
    fi
    [[ -d $STATE_DIR ]] && down >/dev/null 2>&1
    local why
    if ! have_binaries; then
        [[ ${DLLM_TEST_CLUSTER_NO_BUILD:-0} == 1 ]] && unavailable "kube $KUBE_VERSION binaries not built ($BIN_DIR) and DLLM_TEST_CLUSTER_NO_BUILD=1"
        why=$(build) || unavailable "cannot build kube $KUBE_VERSION: $why"
    fi
    why=$(start) || { down >/dev/null 2>&1; unavailable "cannot start the test cluster: $why"; }
    log "ready: KUBECONFIG=$STATE_DIR/kubeconfig"
    echo "export KUBECONFIG=\"$STATE_DIR/kubeconfig\""
}

case ${1:-} in
    up) up ;;
    down) down ;;
    build)
        why=$(build) || { log "build failed: $why"; exit 1; }
        log "binaries in $BIN_DIR" ;;
    status)
        if healthy; then echo "running: KUBECONFIG=$STATE_DIR/kubeconfig"; exit 0; fi
        echo "not running"; exit 1 ;;
    *) echo "usage: $0 up|down|build|status" >&2; exit 2 ;;
esac
