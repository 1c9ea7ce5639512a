#!/usr/bin/env bash
# Glance image upload onto RBD (glance_store's rbd driver, add()): Glance writes the image's bytes into a
# new RBD image named after the image UUID in the `images` pool, then creates the snapshot `snap` on it,
# protects it, and records rbd://<fsid>/images/<uuid>/snap as the image's location (direct_url).
# Through rbdfs that whole flow is one `cp` to MOUNT/images/<uuid>@snap.
#
#   mount-examples/glance-upload.sh MOUNTPOINT
#
# MOUNTPOINT is a live `rbdfs mount` of the cluster that $CEPH_CONF names (the rbd CLI here uses the same).
# Everything the script makes is removed at the end (through the mount: Glance's delete), unless KEEP=1.
set -euo pipefail

mnt=${1:?usage: $0 MOUNTPOINT}
# Show each gesture, set -x style, then run it.
run() { printf '+ %s\n' "$*" >&2; "$@"; }

uuid=$(cat /proc/sys/kernel/random/uuid)
work=$(mktemp -d)
cleanup() {
    rm -rf "$work"
    [[ ${KEEP:-0} == 1 ]] && { echo "KEEP=1: left images/$uuid"; return; }
    # Glance's delete: unprotect + remove the snapshot, then remove the image.
    rm -f "$mnt/images/$uuid@snap" "$mnt/images/$uuid"
}
trap cleanup EXIT

# A small raw "cloud image": 12 MiB of data and a 4 MiB hole, not a whole number of 4 MiB objects.
head -c 12582912 /dev/urandom > "$work/cirros.raw"
truncate -s $((16 * 1048576 + 4096)) "$work/cirros.raw"

echo "== glance image-create --file cirros.raw  (image id $uuid)"
run cp "$work/cirros.raw" "$mnt/images/$uuid@snap"

echo "== what Glance leaves in the cluster"
run rbd info "images/$uuid"
run rbd snap ls "images/$uuid"
run rbd info "images/$uuid@snap"
rbd info "images/$uuid@snap" | grep -q 'protected: True'

echo "== the same, seen through the mount"
run ls -l "$mnt/images/$uuid" "$mnt/images/$uuid@snap"
run getfattr --absolute-names -n user.rbd.location "$mnt/images/$uuid@snap"
run cmp "$work/cirros.raw" "$mnt/images/$uuid@snap"
echo "OK: images/$uuid holds the image and snapshot 'snap' is protected"
