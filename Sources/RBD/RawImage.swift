import Foundation
internal import CRBD
import Storage

/// An open `rbd_image_t` and what its errors name: the metadata reads shared by `CephImage` and
/// `CephStore.describeImages`. librbd serves these from the image context it loaded at open (refreshing it
/// first if a watched image changed), so they cost no round trip. librbd image handles are thread-safe.
struct RawImage: @unchecked Sendable {
    let raw: rbd_image_t
    let spec: ImageSpec
    let snapshot: String?

    /// `pool/image@snap`, for errors.
    var target: String { spec.describing(snapshot: snapshot) }

    /// What `rbd info` shows.
    func info() throws -> ImageInfo {
        var stat = rbd_image_info_t()
        try check(rbd_stat(raw, &stat, MemoryLayout<rbd_image_info_t>.size), "rbd_stat", target)
        var features: UInt64 = 0
        try check(rbd_get_features(raw, &features), "rbd_get_features", target)
        var flags: UInt64 = 0
        try check(rbd_get_flags(raw, &flags), "rbd_get_flags", target)
        var isOldFormat: UInt8 = 0
        try check(rbd_get_old_format(raw, &isOldFormat), "rbd_get_old_format", target)
        return ImageInfo(
            id: try stringFilled("rbd_get_id", target) { rbd_get_id(raw, $0, $1) },
            size: stat.size,
            objectSize: stat.obj_size,
            order: Int(stat.order),
            features: features,
            flags: flags,
            format: isOldFormat != 0 ? 1 : 2,
            blockNamePrefix: try stringFilled("rbd_get_block_name_prefix", target) {
                rbd_get_block_name_prefix(raw, $0, $1)
            },
            createTime: try timestamp("rbd_get_create_timestamp") { rbd_get_create_timestamp(raw, $0) },
            modifyTime: try timestamp("rbd_get_modify_timestamp") { rbd_get_modify_timestamp(raw, $0) },
            accessTime: try timestamp("rbd_get_access_timestamp") { rbd_get_access_timestamp(raw, $0) },
            parent: try parent())
    }

    /// The snapshot this image (or snapshot) was cloned from, or nil.
    private func parent() throws -> ParentInfo? {
        var image = rbd_linked_image_spec_t()
        var snapshot = rbd_snap_spec_t()
        let code = rbd_get_parent(raw, &image, &snapshot)
        if code == -ENOENT { return nil }
        try check(code, "rbd_get_parent", target)
        defer {
            rbd_linked_image_spec_cleanup(&image)
            rbd_snap_spec_cleanup(&snapshot)
        }
        var overlap: UInt64 = 0
        try check(rbd_get_overlap(raw, &overlap), "rbd_get_overlap", target)
        return ParentInfo(
            image: ImageSpec(
                pool: string(image.pool_name), namespace: string(image.pool_namespace),
                name: string(image.image_name)),
            snapshot: string(snapshot.name), overlap: overlap)
    }

    /// User snapshots, oldest first. Trash, group and mirror snapshots are left out, and so is a snapshot
    /// removed by another client while this runs.
    func userSnapshots() throws -> [SnapshotInfo] {
        // Retrying with more room costs no round trip: librbd lists from the image context.
        try withFilledArray(of: rbd_snap_info_t.self, count: 4, { snaps, count in
            var max = Int32(clamping: count)
            defer { count = Int(max) }
            return rbd_snap_list(raw, snaps, &max)
        }) { code, snaps, _ in
            try check(code, "rbd_snap_list", target)
            defer { rbd_snap_list_end(snaps) }
            return try (0..<Int(code))
                .compactMap { try userSnapshot(snaps[$0]) }
                .sorted { $0.id < $1.id }
        }
    }

    private func userSnapshot(_ snap: rbd_snap_info_t) throws -> SnapshotInfo? {
        let name = string(snap.name)
        /// False when the snapshot is gone (removed by another client since it was listed).
        func found(_ code: Int32, _ operation: String) throws -> Bool {
            if code == -ENOENT { return false }
            try check(code, operation, spec.describing(snapshot: name))
            return true
        }
        var namespace = RBD_SNAP_NAMESPACE_TYPE_USER
        guard try found(rbd_snap_get_namespace_type(raw, snap.id, &namespace), "rbd_snap_get_namespace_type"),
              namespace == RBD_SNAP_NAMESPACE_TYPE_USER
        else { return nil }
        var time = timespec()
        var isProtected: Int32 = 0
        guard try found(rbd_snap_get_timestamp(raw, snap.id, &time), "rbd_snap_get_timestamp"),
              try found(rbd_snap_is_protected(raw, name, &isProtected), "rbd_snap_is_protected")
        else { return nil }
        return SnapshotInfo(
            id: snap.id, name: name, size: snap.size, timestamp: Timestamp(time), isProtected: isProtected != 0)
    }

    /// Clones of the snapshot this image is open at; clones in the trash are left out.
    /// Extents holding data since the image was made, whole objects. The corresponding C function is
    /// `rbd_diff_iterate2`; it uses the object map (fast-diff) when the image has a valid one.
    func dataExtents(in range: Range<UInt64>, includingParent: Bool) throws -> [Range<UInt64>] {
        // librbd 16.2 aborts the process (ceph_assert in DiffIterate) on an empty range with fast-diff.
        guard !range.isEmpty else { return [] }
        let collector = ExtentCollector()
        let code = withExtendedLifetime(collector) {
            rbd_diff_iterate2(raw, nil, range.lowerBound, UInt64(range.count), includingParent ? 1 : 0,
                              1 /* whole_object */, ExtentCollector.callback,
                              Unmanaged.passUnretained(collector).toOpaque())
        }
        try check(code, "rbd_diff_iterate2", target)
        return collector.extents
    }

    /// Bytes of the objects the image holds itself (not its parent's), as `rbd du` reports them.
    func usedBytes(size: UInt64) throws -> UInt64 {
        try dataExtents(in: 0..<size, includingParent: false).reduce(0) { $0 + UInt64($1.count) }
    }

    func children() throws -> [ImageSpec] {
        try withFilledArray(of: rbd_linked_image_spec_t.self, count: 16, { specs, count in
            rbd_list_children3(raw, specs, &count)
        }) { code, specs, count in
            try check(code, "rbd_list_children3", target)
            defer { rbd_linked_image_spec_list_cleanup(specs, count) }
            return UnsafeBufferPointer(start: specs, count: count)
                .filter { !$0.trash }
                .map {
                    ImageSpec(pool: string($0.pool_name), namespace: string($0.pool_namespace),
                              name: string($0.image_name))
                }
        }
    }

    private func timestamp(_ operation: String, _ get: (UnsafeMutablePointer<timespec>) -> Int32) throws -> Timestamp {
        var time = timespec()
        try check(get(&time), operation, target)
        return Timestamp(time)
    }
}

extension Timestamp {
    init(_ time: timespec) {
        self.init(seconds: Int64(time.tv_sec), nanoseconds: Int64(time.tv_nsec))
    }
}

/// Collects the extents `rbd_diff_iterate2` reports as holding data.
final class ExtentCollector {
    private let lock = NSLock()
    private var found: [Range<UInt64>] = []

    var extents: [Range<UInt64>] { lock.withLock { found } }

    /// librbd may call back from its own threads, and in no particular order.
    static let callback: @convention(c) (UInt64, Int, Int32, UnsafeMutableRawPointer?) -> Int32 = {
        offset, length, exists, context in
        if exists != 0 {
            let collector = Unmanaged<ExtentCollector>.fromOpaque(context!).takeUnretainedValue()
            collector.lock.withLock { collector.found.append(offset..<offset + UInt64(length)) }
        }
        return 0
    }
}
