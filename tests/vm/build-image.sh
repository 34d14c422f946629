#!/usr/bin/env bash
# Builds (or finds in its cache) the test image of the VM tier: a Debian cloud kernel, a busybox
# initramfs that loads the virtio and vsock modules, and an ext4 root filesystem (debootstrap
# minbase + systemd + python3, the agent's dependencies and the project's wheel, the guest unit
# and init script installed the way docs/guest-image.md says, and the in-guest test driver).
#
# Two layers, both in a cache outside the checkout
# (${PYRO_VM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/pyro-reactor/vm}):
#   <recipe-hash>/base/    kernel, initramfs and the rootfs tree with python3 and the agent's
#                          dependencies; the hash covers the functions below that build it,
#                          the initramfs init and setup.cfg's install_requires. Built once
#                          (~1.5 min, most of it debootstrap).
#   <recipe-hash>/rootfs-<source-hash>.ext4
#                          the base plus this checkout's wheel and the tier's test files; the
#                          hash covers the package, the test driver and this script.
#                          Rebuilt in 5-20 s when one of them changes.
#
# Prints KEY=VALUE lines on stdout (kernel, initrd, rootfs, kernel_release, python); progress
# goes to stderr. Exit status: 0 built or found; 3 a registry (Debian mirror, PyPI) or a host
# tool was unavailable, so the tier cannot run here; 1 anything else (a real failure).
# Needs root (debootstrap, chroot) and: debootstrap, busybox-static, cpio, e2fsprogs, apt.
# `build-image.sh --recipe-hash` prints the base layer's key and exits (a CI cache key).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$HERE/../.." && pwd)
CACHE=${PYRO_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyro-reactor/vm}
SUITE=${PYRO_VM_SUITE:-bookworm}
MIRROR=${PYRO_VM_MIRROR:-http://deb.debian.org/debian}
KERNEL_PACKAGE=linux-image-cloud-amd64
PYTHON=${PYRO_VM_HOST_PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x "$CHECKOUT/.venv/bin/python" ]; then
        PYTHON=$CHECKOUT/.venv/bin/python
    else
        PYTHON=python3
    fi
fi
INFRA=3

say() { echo "vm-image: $*" >&2; }
infrastructure() {
    say "UNAVAILABLE: $*"
    exit "$INFRA"
}
elapsed() { echo $((SECONDS - ${1})); }

requireTools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 ||
            infrastructure "$tool is not installed (apt-get install debootstrap busybox-static cpio e2fsprogs)"
    done
    if [ "$(id -u)" != 0 ]; then
        infrastructure "building the image needs root (debootstrap, chroot)"
    fi
}

installRequires() {
    "$PYTHON" - "$CHECKOUT/setup.cfg" <<'EOF'
import configparser, sys
parser = configparser.ConfigParser()
parser.read(sys.argv[1])
for line in parser["options"]["install_requires"].splitlines():
    if line.strip():
        print(line.strip())
EOF
}

guestPython() { chroot "$1" /usr/bin/python3 "${@:2}"; }

buildBase() {
    local started=$SECONDS
    requireTools debootstrap cpio chroot dpkg-deb apt-get apt-cache busybox gzip
    BUSYBOX=$(command -v busybox)
    local linkage
    linkage=$(ldd "$BUSYBOX" 2>&1 || true)
    if [[ $linkage != *"not a dynamic executable"* ]]; then
        infrastructure "$BUSYBOX is not statically linked (apt-get install busybox-static)"
    fi
    work=$(mktemp -d "$KEYDIR/base.tmp-XXXXXX")
    trap 'rm -rf "$work"' EXIT
    say "building the base layer in $work (recipe $RECIPE_HASH)"

    # The kernel: Debian's cloud kernel package, unpacked (never installed on the host).
    local kernelPackage
    kernelPackage=$(apt-cache depends "$KERNEL_PACKAGE" 2>/dev/null |
        awk '/Depends: linux-image-/ {print $2; exit}')
    [ -n "$kernelPackage" ] ||
        infrastructure "apt does not know $KERNEL_PACKAGE (run apt-get update; is the Debian mirror reachable?)"
    mkdir -p "$work/kernel-deb"
    chmod 777 "$work/kernel-deb"
    (cd "$work/kernel-deb" && apt-get download -q -o APT::Sandbox::User=root "$kernelPackage" >&2) ||
        infrastructure "apt-get download $kernelPackage failed (Debian mirror unreachable?)"
    dpkg-deb -x "$work"/kernel-deb/*.deb "$work/kernel"
    local release
    release=$(basename "$(ls -d "$work"/kernel/lib/modules/*)")
    cp "$work/kernel/boot/vmlinuz-$release" "$work/vmlinuz"
    echo "$release" >"$work/kernel-release"
    say "kernel $release ($kernelPackage) after $(elapsed "$started") s"

    # The initramfs: static busybox as PID 1 with the modules the root fs and vsock need.
    local initramfs=$work/initramfs
    local modules=$work/kernel/lib/modules/$release
    local target=$initramfs/lib/modules/$release
    mkdir -p "$initramfs"/{bin,dev,proc,sys,newroot} "$target"
    cp "$BUSYBOX" "$initramfs/bin/busybox"
    ln -s busybox "$initramfs/bin/sh"
    install -m 755 "$HERE/initramfs-init" "$initramfs/init"
    (cd "$modules" && cp --parents -r \
        kernel/drivers/virtio kernel/drivers/block/virtio_blk.ko \
        kernel/drivers/net/virtio_net.ko kernel/drivers/net/net_failover.ko \
        kernel/net/core/failover.ko kernel/net/vmw_vsock "$target/" &&
        cp modules.builtin modules.order "$target/")
    busybox depmod -b "$initramfs" "$release"
    (cd "$initramfs" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.img"
    rm -rf "$initramfs" "$work/kernel" "$work/kernel-deb"

    # The root filesystem: minbase plus python3 and systemd as init.
    local rootfs=$work/rootfs
    say "debootstrap $SUITE (minbase, python3, systemd) from $MIRROR"
    if ! debootstrap --variant=minbase --include=python3,systemd-sysv \
        "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
        tail -n 15 "$work/debootstrap.log" >&2
        if grep -qiE 'Failed getting release file|Couldn.t download|Could not resolve|Connection (refused|timed out)|unable to fetch|Temporary failure' "$work/debootstrap.log"; then
            infrastructure "debootstrap could not download from $MIRROR"
        fi
        say "debootstrap failed"
        exit 1
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    echo pyro-guest >"$rootfs/etc/hostname"
    : >"$rootfs/etc/fstab"
    # No login prompts on the consoles: nothing here logs in.
    ln -sf /dev/null "$rootfs/etc/systemd/system/getty.target"
    ln -sf /dev/null "$rootfs/etc/systemd/system/serial-getty@.service"
    say "debootstrap done after $(elapsed "$started") s"

    # The agent's dependencies, as wheels for the guest's Python, installed from the host.
    local version
    version=$(guestPython "$rootfs" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    local site=$rootfs/usr/local/lib/python$version/dist-packages
    local abi=cp${version/./}
    mkdir -p "$site"
    echo "$REQUIREMENTS" >"$work/requirements.txt"
    if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-compile \
        --target "$work/deps" --only-binary=:all: --implementation cp \
        --python-version "$version" --abi "$abi" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform linux_x86_64 \
        -r "$work/requirements.txt" >&2; then
        infrastructure "pip could not download the agent's dependencies for $abi (PyPI unreachable?)"
    fi
    installScripts "$work/deps/bin" "$rootfs"
    cp -a "$work/deps/." "$site/"
    rm -rf "$work/deps"
    # Byte-compile with the guest's own Python, or every boot compiles under emulation.
    guestPython "$rootfs" -m compileall -q -j 0 "/${site#"$rootfs"/}" >/dev/null
    echo "$version" >"$work/python-version"
    say "dependencies for cp$version installed after $(elapsed "$started") s"

    rm -rf "$BASE"
    mv "$work" "$BASE"
    trap - EXIT
    say "base layer ready in $(elapsed "$started") s: $BASE"
}

installScripts() {
    # pip --target leaves console scripts with the host's interpreter: point them at the guest's.
    local from=$1 rootfs=$2 script
    [ -d "$from" ] || return 0
    for script in "$from"/*; do
        sed '1s|^#!.*python.*$|#!/usr/bin/python3|' "$script" >"$rootfs/usr/local/bin/$(basename "$script")"
        chmod 755 "$rootfs/usr/local/bin/$(basename "$script")"
    done
    rm -rf "$from"
}

REQUIREMENTS=$(installRequires)
# The base layer's recipe: the functions that build it (as bash prints them, so comments and
# the project layer's steps below do not count), the initramfs init and the dependencies.
RECIPE_HASH=$(
    {
        declare -f buildBase installScripts guestPython
        cat "$HERE/initramfs-init"
        echo "$SUITE $KERNEL_PACKAGE"
        echo "$REQUIREMENTS"
    } | sha256sum | cut -c1-16
)
if [ "${1:-}" = --recipe-hash ]; then
    echo "$RECIPE_HASH" # e.g. a cache key for CI
    exit 0
fi
KEYDIR=$CACHE/$RECIPE_HASH
BASE=$KEYDIR/base
mkdir -p "$KEYDIR"

# One build at a time per recipe (a second run waits, then finds the result).
exec 9>"$KEYDIR/.lock"
flock 9
touch "$KEYDIR"
# Recipes change: keep the three most recently used, drop older ones (if nobody holds them).
for old in $(ls -dt "$CACHE"/*/ 2>/dev/null | tail -n +4); do
    (flock -n 9 && rm -rf "$old") 9>"$old/.lock" || true
done

if [ ! -f "$BASE/rootfs/usr/bin/python3" ] || [ ! -f "$BASE/initrd.img" ]; then
    buildBase
fi
VERSION=$(cat "$BASE/python-version")
SITE=usr/local/lib/python$VERSION/dist-packages

# --- the project layer ---------------------------------------------------------------------
SOURCE_HASH=$(
    cd "$CHECKOUT"
    {
        find pyro_reactor twisted/plugins tests/vm/guest_checks.py tests/vm/pyro-vm-tests.service \
            -type f \
            ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
        sha256sum setup.cfg pyproject.toml tests/vm/build-image.sh
    } | sha256sum | cut -c1-16
)
IMAGE=$KEYDIR/rootfs-$SOURCE_HASH.ext4

if [ ! -f "$IMAGE" ]; then
    started=$SECONDS
    requireTools chroot mkfs.ext4 truncate
    work=$(mktemp -d "$KEYDIR/image.tmp-XXXXXX")
    trap 'rm -rf "$work"' EXIT
    say "building the project layer (source $SOURCE_HASH)"

    # The wheel, built from a copy of the checkout so the shared tree gets no build/ litter.
    mkdir -p "$work/src"
    (cd "$CHECKOUT" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' \
        setup.cfg pyproject.toml README.md LICENSE pyro_reactor twisted/plugins) |
        tar -xf - -C "$work/src"
    if ! "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps \
        -w "$work/wheel" "$work/src" >"$work/wheel.log" 2>&1; then
        cat "$work/wheel.log" >&2
        if grep -qiE 'Could not find a version|Failed to establish|Max retries|Temporary failure|No matching distribution' "$work/wheel.log"; then
            infrastructure "pip could not fetch the build backend (setuptools) to build the wheel"
        fi
        say "building the wheel failed"
        exit 1
    fi
    wheel=$(ls "$work"/wheel/*.whl)
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
        --target "$work/project" "$wheel" >&2

    cp -a --reflink=auto "$BASE/rootfs" "$work/rootfs"
    rootfs=$work/rootfs
    installScripts "$work/project/bin" "$rootfs"
    # Merges into twisted/plugins/ next to Twisted's own plugins.
    cp -a "$work/project/." "$rootfs/$SITE/"

    # What docs/guest-image.md tells users to do, in the guest's own terms.
    chroot "$rootfs" /bin/sh -euc "
        python3 -m compileall -q /$SITE/pyro_reactor /$SITE/twisted/plugins >/dev/null
        python3 -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
        guest=\$(python3 -c 'import pyro_reactor.guest as g; print(g.__path__[0])')
        install -m 644 \"\$guest/pyro-agent.service\" /etc/systemd/system/pyro-agent.service
        install -m 755 \"\$guest/pyro-agent.init\" /etc/init.d/pyro-agent
        install -m 644 \"\$guest/pyro-agent.default\" /etc/default/pyro-agent
        systemctl enable pyro-agent.service 2>/dev/null
    "
    [ -s "$rootfs/$SITE/twisted/plugins/dropin.cache" ] || {
        say "dropin.cache was not regenerated"
        exit 1
    }

    # The tier's own files: the agent also listens on TCP for the host's checks through
    # QEMU's hostfwd, and a unit runs the in-guest driver once the agent's unit has started.
    install -d "$rootfs/opt/pyro-vm-tests"
    install -m 644 "$HERE/guest_checks.py" "$rootfs/opt/pyro-vm-tests/guest_checks.py"
    install -m 644 "$HERE/pyro-vm-tests.service" "$rootfs/etc/systemd/system/pyro-vm-tests.service"
    printf 'PYRO_AGENT_ARGS="--listen tcp:5006"\n' >>"$rootfs/etc/default/pyro-agent"
    # e2fsprogs' boot-time scrub costs ~7 s of emulated CPU and checks nothing here.
    ln -sf /dev/null "$rootfs/etc/systemd/system/e2scrub_reap.service"
    chroot "$rootfs" systemctl enable pyro-vm-tests.service 2>/dev/null

    truncate -s 1536M "$work/rootfs.ext4"
    mkfs.ext4 -q -F -L pyro-root -d "$rootfs" "$work/rootfs.ext4"
    mv "$work/rootfs.ext4" "$IMAGE"
    rm -rf "$work"
    trap - EXIT
    # Keep the three newest project images of this recipe.
    ls -t "$KEYDIR"/rootfs-*.ext4 2>/dev/null | tail -n +4 | xargs -r rm -f
    say "project layer ready in $(elapsed "$started") s: $IMAGE"
fi

echo "kernel=$BASE/vmlinuz"
echo "initrd=$BASE/initrd.img"
echo "rootfs=$IMAGE"
echo "kernel_release=$(cat "$BASE/kernel-release")"
echo "python=$VERSION"
echo "recipe=$RECIPE_HASH"
echo "source=$SOURCE_HASH"
