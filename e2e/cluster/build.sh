#!/usr/bin/env bash
# Build (or reuse from the cache) the binaries of backdial's local Kubernetes
# test control plane: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok and helm.
#
# Every binary is built from the Go module proxy through a small wrapper module
# under e2e/cluster/go/<name>/ (committed go.mod + go.sum), with CGO_ENABLED=0
# and -trimpath. Outputs land outside the work tree:
#
#   $BACKDIAL_CACHE_DIR/<name>/<version>-<key>/bin/...   (default ~/.cache/backdial)
#   $BACKDIAL_CACHE_DIR/bin/<tool> -> the current build   (stable symlinks)
#
# <key> hashes the wrapper module (go.mod, go.sum, *.go), the Go version, the
# build flags and the source overlay (below), so editing a wrapper triggers a
# rebuild while an unchanged one is skipped.
#
# One upstream check is relaxed in kube-apiserver (k8s only): endpoint addresses
# in 127.0.0.0/8 are accepted in Endpoints/EndpointSlices, because every pod IP
# of the test cluster is a loopback address (docs/k8s-harness.md, "Patched
# validation"). `go build -overlay` may not replace files of the module cache,
# so the build uses a copy of k8s.io/kubernetes made of hard links into the
# module cache ($BACKDIAL_CACHE_DIR/k8s/src/, nearly no disk), in which only the
# patched file is a real file, and a generated go.mod (`-modfile`) that replaces
# k8s.io/kubernetes by that copy. No upstream source is committed. The script is idempotent; it prints per-component timings on
# stderr and, on stdout, one `tool=/abs/path` line per tool (consumed by
# harness.py).
#
# Usage: build.sh [--print-only] [component...]   (components: k8s etcd kwok helm)
#   --print-only   do not build; fail if something is missing from the cache.
#
# Environment: GO (go binary), BACKDIAL_CACHE_DIR, GOMODCACHE/GOCACHE as usual.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODULES_DIR="$HERE/go"
CACHE_ROOT="${BACKDIAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/backdial}"

if [[ -z "${GO:-}" ]]; then
    if command -v go >/dev/null 2>&1; then
        GO="$(command -v go)"
    elif [[ -x /usr/local/go/bin/go ]]; then
        GO=/usr/local/go/bin/go
    else
        echo "build.sh: no Go toolchain found (set GO or put go on PATH)" >&2
        exit 3
    fi
fi

# Never fall back to another Go toolchain download or workspace behind our back;
# and build with the committed go.sum only (no -mod=mod).
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOWORK=off
export CGO_ENABLED=0
# Flags given to every go command (command-line flags win over $GOFLAGS).
GO_BUILD_FLAGS=(-mod=readonly -buildvcs=false -trimpath)

PRINT_ONLY=0
COMPONENTS=()
for arg in "$@"; do
    case "$arg" in
        --print-only) PRINT_ONLY=1 ;;
        k8s | etcd | kwok | helm) COMPONENTS+=("$arg") ;;
        -h | --help)
            sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "build.sh: unknown argument: $arg" >&2
            exit 2
            ;;
    esac
done
if [[ ${#COMPONENTS[@]} -eq 0 ]]; then
    COMPONENTS=(etcd k8s kwok helm)
fi

GO_VERSION="$("$GO" env GOVERSION)"

log() { echo "build.sh: $*" >&2; }

# module_version DIR MODULE -> version of MODULE in the wrapper module's build list.
module_version() {
    (cd "$1" && "$GO" list -mod=readonly -m -f '{{.Version}}' "$2")
}

# cache_key DIR EXTRA... -> short hash of the wrapper module sources + toolchain + flags.
cache_key() {
    local dir="$1"
    shift
    {
        printf '%s\n' "$GO_VERSION" "$@"
        (cd "$dir" && cat go.mod go.sum && find . -maxdepth 1 -name '*.go' -print0 | sort -z |
            xargs -0 -r cat)
    } | sha256sum | cut -c1-16
}

# The one relaxed check: ValidateEndpointIP's loopback rejection.
PATCH_FILE=pkg/apis/core/validation/validation.go
PATCH_FROM='if ip.IsLoopback() {'
PATCH_TO='if false \&\& ip.IsLoopback() { // backdial test cluster: pod IPs are loopback addresses'

# k8s_patched_module DIR -> prepares the patched copy and go.mod; sets MODFILE and PATCHED.
MODFILE=""
PATCHED=""
k8s_patched_module() {
    local dir="$1" version moddir src count work copy
    (cd "$dir" && "$GO" mod download k8s.io/kubernetes)
    version="$(module_version "$dir" k8s.io/kubernetes)"
    moddir="$(cd "$dir" && "$GO" list -mod=readonly -m -f '{{.Dir}}' k8s.io/kubernetes)"
    src="$moddir/$PATCH_FILE"
    count="$(grep -cF "$PATCH_FROM" "$src" || true)"
    if [[ "$count" != 1 ]]; then
        log "k8s: expected exactly one '$PATCH_FROM' in $src, found $count: update the patch"
        return 1
    fi
    work="$CACHE_ROOT/k8s/src"
    copy="$work/kubernetes@$version"
    PATCHED="$copy/$PATCH_FILE"
    if [[ ! -f "$copy/.complete" ]]; then
        [[ -d "$copy" ]] && chmod -R u+w "$copy" && rm -rf "$copy"
        mkdir -p "$work"
        cp -al "$moddir" "$copy.tmp" 2>/dev/null || cp -a "$moddir" "$copy.tmp"
        chmod u+w "$copy.tmp" "$copy.tmp/$(dirname "$PATCH_FILE")"
        rm -f "$copy.tmp/$PATCH_FILE" # a hard link: never write through it
        sed "s|$PATCH_FROM|$PATCH_TO|" "$src" >"$copy.tmp/$PATCH_FILE"
        touch "$copy.tmp/.complete"
        mv -T "$copy.tmp" "$copy"
    fi
    cp "$dir/go.mod" "$work/go.mod"
    cp "$dir/go.sum" "$work/go.sum"
    printf '\nreplace k8s.io/kubernetes => %s\n' "$copy" >>"$work/go.mod"
    MODFILE="$work/go.mod"
}

# build_component NAME -> builds into the cache if missing; sets OUT_DIR.
OUT_DIR=""
build_component() {
    local name="$1" dir="$MODULES_DIR/$1" module pkg version ldflags key
    local -a tools
    case "$name" in
        k8s)
            module=k8s.io/kubernetes
            pkg=.
            tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
            ;;
        etcd)
            module=go.etcd.io/etcd/server/v3
            pkg=.
            tools=(etcd)
            ;;
        kwok)
            module=sigs.k8s.io/kwok
            pkg=sigs.k8s.io/kwok/cmd/kwok
            tools=(kwok)
            ;;
        helm)
            module=helm.sh/helm/v3
            pkg=helm.sh/helm/v3/cmd/helm
            tools=(helm)
            ;;
    esac
    version="$(module_version "$dir" "$module")"
    ldflags="-s -w"
    case "$name" in
        k8s)
            local major minor
            major="${version#v}"
            major="${major%%.*}"
            minor="${version#v*.}"
            minor="${minor%%.*}"
            local p
            for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
                ldflags+=" -X $p.gitVersion=$version -X $p.gitMajor=$major"
                ldflags+=" -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
                ldflags+=" -X $p.gitCommit= -X $p.buildDate=1970-01-01T00:00:00Z"
            done
            ;;
        helm)
            ldflags+=" -X helm.sh/helm/v3/internal/version.version=$version"
            ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
            ;;
    esac
    local -a patch_flags=()
    local patch_key=""
    if [[ "$name" == k8s ]]; then
        k8s_patched_module "$dir" || return 1
        patch_flags=(-modfile "$MODFILE")
        patch_key="$PATCH_FILE $(sha256sum "$PATCHED" | cut -c1-16)"
    fi
    key="$(cache_key "$dir" "$pkg" "$ldflags" ${patch_key:+"$patch_key"})"
    OUT_DIR="$CACHE_ROOT/$name/$version-$key"
    local bin="$OUT_DIR/bin" main_tool="${tools[0]}"
    [[ "$name" == k8s ]] && main_tool=k8s
    if [[ -x "$bin/$main_tool" ]]; then
        log "$name $version: cached in $OUT_DIR"
    elif [[ $PRINT_ONLY -eq 1 ]]; then
        log "$name $version: not built (expected $bin/$main_tool)"
        return 1
    else
        log "$name $version: building into $OUT_DIR (go $GO_VERSION) ..."
        local start=$SECONDS tmp
        mkdir -p "$CACHE_ROOT/$name"
        tmp="$(mktemp -d "$CACHE_ROOT/$name/.tmp-XXXXXX")"
        chmod 755 "$tmp"
        mkdir -p "$tmp/bin"
        if ! (cd "$dir" && "$GO" build "${GO_BUILD_FLAGS[@]}" "${patch_flags[@]}" -ldflags "$ldflags" -o "$tmp/bin/$main_tool" \
            "$pkg"); then
            rm -rf "$tmp"
            log "$name $version: go build FAILED"
            return 1
        fi
        if [[ "$name" == k8s ]]; then
            local t
            for t in "${tools[@]}"; do ln -s k8s "$tmp/bin/$t"; done
        fi
        printf '%s\n' "component=$name" "version=$version" "key=$key" "go=$GO_VERSION" \
            "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)" "seconds=$((SECONDS - start))" \
            >"$tmp/BUILD-INFO"
        # Atomic publish: another build may have finished first; keep either.
        if ! mv -T "$tmp" "$OUT_DIR" 2>/dev/null; then
            rm -rf "$tmp"
        fi
        log "$name $version: built in $((SECONDS - start))s ($(du -sh "$bin" | cut -f1))"
        # Keep the two newest builds of this component (a running cluster may use the other).
        local old
        while IFS= read -r old; do
            log "$name: pruning old build $old"
            rm -rf "$old"
        done < <(ls -1dt "$CACHE_ROOT/$name"/v*/ 2>/dev/null | tail -n +3)
    fi
    mkdir -p "$CACHE_ROOT/bin"
    local t
    for t in "${tools[@]}"; do
        ln -sfn "$bin/$t" "$CACHE_ROOT/bin/$t"
        echo "$t=$bin/$t"
    done
}

total_start=$SECONDS
status=0
for c in "${COMPONENTS[@]}"; do
    build_component "$c" || status=1
done
log "done in $((SECONDS - total_start))s (cache: $CACHE_ROOT)"
exit $status
