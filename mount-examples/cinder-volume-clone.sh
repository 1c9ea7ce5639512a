#!/usr/bin/env bash
# Cinder's RBD driver: create_cloned_volume (a volume from a volume: snapshot <new>.clone_snap of the
# source, protect it, clone it as the new volume), create_snapshot + create_volume_from_snapshot, and a
# volume from a Glance image (a clone of images/<id>@snap when Glance is on the same cluster).
# Through rbdfs each is one ln.
#
#   mount-examples/cinder-volume-clone.sh MOUNTPOINT
#
# MOUNTPOINT is a live `rbdfs mount` of the cluster that $CEPH_CONF names (the rbd CLI here uses the same).
# Everything the script makes is removed at the end, unless KEEP=1.
set -euo pipefail

mnt=${1:?usage: $0 MOUNTPOINT}
run() { printf '+ %s\n' "$*" >&2; "$@"; }
new_id() { cat /proc/sys/kernel/random/uuid; }

source_volume=volume-$(new_id)
cloned_volume=volume-$(new_id)
snapshot=snapshot-$(new_id)
from_snapshot=volume-$(new_id)
image=$(new_id)
from_image=volume-$(new_id)
work=$(mktemp -d)
cleanup() {
    rm -rf "$work"
    [[ ${KEEP:-0} == 1 ]] && { echo "KEEP=1: left volumes/$source_volume and its clones, images/$image"; return; }
    local v=$mnt/volumes
    rm -f "$v/$from_image" "$v/$from_snapshot" "$v/$cloned_volume"
    rm -f "$v/$source_volume@$snapshot" "$v/$source_volume@$cloned_volume.clone_snap" "$v/$source_volume"
    rm -f "$mnt/images/$image@snap" "$mnt/images/$image"
}
trap cleanup EXIT

echo "== cinder create 1 (a 1 GiB volume) and some data on it"
run truncate -s 1G "$mnt/volumes/$source_volume"
head -c 4194304 /dev/urandom > "$work/data"
run dd if="$work/data" of="$mnt/volumes/$source_volume" bs=1M conv=notrunc,fsync status=none

echo "== cinder create --source-volid <source>: create_cloned_volume"
run ln "$mnt/volumes/$source_volume" "$mnt/volumes/$cloned_volume"
run rbd snap ls "volumes/$source_volume"
run rbd info "volumes/$cloned_volume"
rbd info "volumes/$cloned_volume" | grep -q "parent: volumes/$source_volume@$cloned_volume.clone_snap"

echo "== cinder snapshot-create, then cinder create --snapshot-id: a volume from a volume snapshot"
run ln "$mnt/volumes/$source_volume" "$mnt/volumes/$source_volume@$snapshot"
run ln "$mnt/volumes/$source_volume@$snapshot" "$mnt/volumes/$from_snapshot"
run rbd info "volumes/$from_snapshot"
rbd info "volumes/$from_snapshot" | grep -q "parent: volumes/$source_volume@$snapshot"

echo "== cinder create --image-id: a volume from a Glance image (see glance-upload.sh)"
head -c 6291456 /dev/urandom > "$work/image.raw"
run cp "$work/image.raw" "$mnt/images/$image@snap"
run ln "$mnt/images/$image@snap" "$mnt/volumes/$from_image"
run rbd info "volumes/$from_image"
rbd info "volumes/$from_image" | grep -q "parent: images/$image@snap"
run rbd children "images/$image@snap"

echo "== the volumes, seen through the mount"
sleep 1.2  # the kernel keeps a file's attributes (the snapshots' link counts) for 1 s
run ls -l "$mnt/volumes/$source_volume" "$mnt/volumes/$cloned_volume" "$mnt/volumes/$from_snapshot" "$mnt/volumes/$from_image"
run getfattr --absolute-names -n user.rbd.parent "$mnt/volumes/$cloned_volume"
run cmp -n 4194304 "$work/data" "$mnt/volumes/$cloned_volume"
run cmp "$work/image.raw" "$mnt/volumes/$from_image"
echo "OK: three clones, each with its parent in rbd info"
