#!/usr/bin/env bash
# Nova booting an instance from a Glance image with images_type=rbd (the libvirt driver's Rbd image
# backend): instead of downloading the image, Nova clones the Glance snapshot images/<image>@snap as
# vms/<instance uuid>_disk ("clone, don't download") and grows it to the flavor's root disk; the flavor's
# ephemeral and swap disks are new, thin images vms/<uuid>_disk.local and vms/<uuid>_disk.swap.
# Through rbdfs: ln for the clone, truncate for the sizes.
#
#   mount-examples/nova-boot.sh MOUNTPOINT
#
# MOUNTPOINT is a live `rbdfs mount` of the cluster that $CEPH_CONF names (the rbd CLI here uses the same).
# Everything the script makes is removed at the end, unless KEEP=1.
set -euo pipefail

mnt=${1:?usage: $0 MOUNTPOINT}
run() { printf '+ %s\n' "$*" >&2; "$@"; }

image=$(cat /proc/sys/kernel/random/uuid)
instance=$(cat /proc/sys/kernel/random/uuid)
work=$(mktemp -d)
cleanup() {
    rm -rf "$work"
    [[ ${KEEP:-0} == 1 ]] && { echo "KEEP=1: left images/$image and vms/${instance}_disk*"; return; }
    rm -f "$mnt/vms/${instance}_disk" "$mnt/vms/${instance}_disk.local" "$mnt/vms/${instance}_disk.swap"
    rm -f "$mnt/images/$image@snap" "$mnt/images/$image"
}
trap cleanup EXIT

echo "== a Glance image to boot from (see glance-upload.sh)"
head -c 8388608 /dev/urandom > "$work/image.raw"
run cp "$work/image.raw" "$mnt/images/$image@snap"

echo "== nova boot --image $image --flavor (root 1 GiB, ephemeral 1 GiB, swap 512 MiB)"
# The root disk: a clone of the Glance snapshot, O(1) whatever the image size; then grown to the flavor.
run ln "$mnt/images/$image@snap" "$mnt/vms/${instance}_disk"
run truncate -s 1G "$mnt/vms/${instance}_disk"
# Ephemeral and swap: new thin images.
run truncate -s 1G "$mnt/vms/${instance}_disk.local"
run truncate -s 512M "$mnt/vms/${instance}_disk.swap"

echo "== the instance's disks"
run ls -l "$mnt/vms/${instance}_disk" "$mnt/vms/${instance}_disk.local" "$mnt/vms/${instance}_disk.swap"
# The Glance snapshot now has a clone: its link count is 2.
sleep 1.2  # the kernel keeps a file's attributes for 1 s
run ls -l "$mnt/images/$image@snap"
run rbd children "images/$image@snap"
run rbd info "vms/${instance}_disk"
run rbd du "vms/${instance}_disk.local"
run rbd du "vms/${instance}_disk.swap"
rbd info "vms/${instance}_disk" | grep -q "parent: images/$image@snap"
[[ $(rbd children "images/$image@snap") == "vms/${instance}_disk" ]]
# The clone reads the image's bytes, followed by zeros up to the flavor's size.
run cmp -n 8388608 "$work/image.raw" "$mnt/vms/${instance}_disk"
echo "OK: vms/${instance}_disk is a clone of images/$image@snap; _disk.local and _disk.swap are thin"
