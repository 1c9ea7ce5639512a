#!/usr/bin/env bash
# Deleting a Glance image that a Nova instance was booted from: the instance's disk is a clone of the
# image's snapshot, so glance_store cannot unprotect the snapshot (librbd: ImageBusy) and Glance answers
# "Image ... is in use through the backend store" (HTTP 409); nothing is deleted. Through rbdfs the same
# refusal is an errno: rm of the snapshot is EBUSY, rm of the image (which still has that snapshot) is
# ENOTEMPTY. Once the instance is deleted, both go.
#
#   mount-examples/delete-in-use-image.sh MOUNTPOINT
#
# MOUNTPOINT is a live `rbdfs mount` of the cluster that $CEPH_CONF names (the rbd CLI here uses the same).
# Everything the script makes is removed at the end, unless KEEP=1.
set -euo pipefail

mnt=${1:?usage: $0 MOUNTPOINT}
run() { printf '+ %s\n' "$*" >&2; "$@"; }
# A gesture that must be refused: show it, its error, and stop the script if it succeeded.
refused() {
    printf '+ %s   (must be refused)\n' "$*" >&2
    if "$@"; then echo "UNEXPECTED: '$*' succeeded" >&2; exit 1; fi
}

image=$(cat /proc/sys/kernel/random/uuid)
instance=$(cat /proc/sys/kernel/random/uuid)
work=$(mktemp -d)
cleanup() {
    rm -rf "$work"
    [[ ${KEEP:-0} == 1 ]] && { echo "KEEP=1: left what remains of images/$image and vms/${instance}_disk"; return; }
    rm -f "$mnt/vms/${instance}_disk" "$mnt/images/$image@snap" "$mnt/images/$image"
}
trap cleanup EXIT

echo "== a Glance image, and an instance booted from it (see glance-upload.sh, nova-boot.sh)"
head -c 4194304 /dev/urandom > "$work/image.raw"
run cp "$work/image.raw" "$mnt/images/$image@snap"
run ln "$mnt/images/$image@snap" "$mnt/vms/${instance}_disk"
run rbd children "images/$image@snap"

echo "== glance image-delete $image while the instance uses it"
err=$( { refused rm "$mnt/images/$image@snap"; } 2>&1 ) || exit 1
echo "$err"
[[ $err == *"Device or resource busy"* ]]
err=$( { refused rm "$mnt/images/$image"; } 2>&1 ) || exit 1
echo "$err"
[[ $err == *"Directory not empty"* ]]

echo "== nothing was touched"
run rbd snap ls "images/$image"
rbd info "images/$image@snap" | grep -q 'protected: True'
run rbd children "images/$image@snap"
run cmp "$work/image.raw" "$mnt/images/$image@snap"

echo "== nova delete, then glance image-delete: now both go"
run rm "$mnt/vms/${instance}_disk"
run rm "$mnt/images/$image@snap"
run rm "$mnt/images/$image"
run rbd ls images
if rbd ls images | grep -qF "$image"; then echo "UNEXPECTED: images/$image still exists" >&2; exit 1; fi
echo "OK: the in-use image was refused (EBUSY / ENOTEMPTY) and deleted once free"
