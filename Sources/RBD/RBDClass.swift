import Foundation
import Storage

/// The methods of the OSDs' `rbd` object class (`cls_rbd`) that `describeImages` and `describeSnapshots`
/// read image and snapshot metadata with, without opening images: what they take and what they answer, as
/// Ceph Pacific encodes them. librbd reads the same when it opens an image (`image::OpenRequest`,
/// `image::RefreshRequest`), lists a snapshot's children (`api::Image::list_children`) and diffs it against
/// its beginning with fast-diff (`object_map::DiffRequest`).
enum RBDClass {
    static let name = "rbd"
    /// `CEPH_NOSNAP`: the image's head rather than a snapshot.
    static let head: UInt64 = UInt64.max - 1

    static let directoryObject = "rbd_directory"
    static func headerObject(id: String) -> String { "rbd_header.\(id)" }
    static func objectMapObject(id: String) -> String { "rbd_object_map.\(id)" }
    /// A snapshot's object map: the head's name, a dot and the snapshot id as 16 hex digits
    /// (`ObjectMap::object_map_name`).
    static func objectMapObject(id: String, snapshotID: UInt64) -> String {
        let hex = String(snapshotID, radix: 16)
        return "rbd_object_map.\(id).\(String(repeating: "0", count: max(0, 16 - hex.count)))\(hex)"
    }
    /// Clone v1 links, in every pool: parent snapshot → the ids of its clones in this pool.
    static let childrenObject = "rbd_children"
    static let trashObject = "rbd_trash"

    /// `RBD_FEATURE_LAYERING`: an image without it has no clones (librbd does not look for any).
    static let layeringFeature: UInt64 = 1 << 0
    /// Features of images read here rather than opened: layering, exclusive-lock, object-map, fast-diff,
    /// deep-flatten, data-pool and operations (`RBD_FEATURE_*` in `rbd/features.h`). None of them changes
    /// what is read or how: a data pool holds only data objects, the header and object maps stay in the
    /// image's pool.
    static let describableFeatures: UInt64 = 1 << 0 | 1 << 2 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 7 | 1 << 8
    /// object-map and fast-diff: with both, librbd's used bytes come from the object maps.
    static let objectMapFeatures: UInt64 = 1 << 3 | 1 << 4
    /// `RBD_FLAG_OBJECT_MAP_INVALID`, `RBD_FLAG_FAST_DIFF_INVALID`.
    static let invalidObjectMapFlags: UInt64 = 1 << 0 | 1 << 1

    /// `RBD_PROTECTION_STATUS_PROTECTED`.
    static let protectedStatus: UInt8 = 2
    /// `SNAPSHOT_NAMESPACE_TYPE_USER`.
    static let userSnapshotNamespace: UInt32 = 0

    // MARK: Directory

    /// `dir_get_id`: an image's id by name, from `rbd_directory`; ENOENT for no such (format 2) image.
    static func addIDLookup(_ read: ObjectClassRead, name imageName: String) -> Int {
        read.call(RBDClass.name, "dir_get_id", input: CephEncoder.encoding { $0.string(imageName) }, mayFail: true)
    }

    /// `dir_get_name`: an image's name by id, from `rbd_directory`; ENOENT for an image not listed there (in
    /// the trash, or gone). One that `mayFail` fails only itself.
    static func addNameLookup(_ read: ObjectClassRead, id: String, mayFail: Bool = false) -> Int {
        read.call(RBDClass.name, "dir_get_name", input: CephEncoder.encoding { $0.string(id) }, mayFail: mayFail)
    }

    /// The reply of `dir_get_id` or `dir_get_name`: a string.
    static func decodeString(_ reply: [UInt8]) throws -> String {
        var decoder = CephDecoder(reply)
        return try decoder.string()
    }

    // MARK: Header

    /// The head of a format-2 image, as its header object says.
    struct Header {
        var order: Int
        var size: UInt64
        var features: UInt64
        var flags: UInt64
        /// Every snapshot, user or not, newest first (a snapshot context's order).
        var snapshotIDs: [UInt64]
        var objectPrefix: String
        var createTime: Timestamp
        var accessTime: Timestamp
        var modifyTime: Timestamp
        /// The parent spec stored with the image, if any (it may outlive the head's link, see `parentOverlap`).
        var parent: ParentSpec?
        /// How much of the parent the head still maps; nil once the head no longer links to it.
        var parentOverlap: UInt64?
    }

    /// `cls::rbd::ParentImageSpec`.
    struct ParentSpec: Hashable {
        var poolID: Int64
        var namespace: String
        var imageID: String
        var snapshotID: UInt64
    }

    /// Where each call of `Header`'s read is in the operation.
    struct HeaderCalls {
        private let size, features, flags, snapshotContext, objectPrefix: Int
        private let createTime, accessTime, modifyTime, parent, parentOverlap: Int

        /// Adds the calls to `read` (on `rbd_header.<id>`); none may fail, so a missing header fails it all.
        init(adding read: ObjectClassRead) {
            let head = CephEncoder.encoding { $0.u64(RBDClass.head) }
            size = read.call(RBDClass.name, "get_size", input: head)
            // `read_only` true, as a read-only open asks: only the incompatible features it reports differ.
            features = read.call(RBDClass.name, "get_features", input: CephEncoder.encoding {
                $0.u64(RBDClass.head)
                $0.bool(true)
            })
            flags = read.call(RBDClass.name, "get_flags", input: head)
            snapshotContext = read.call(RBDClass.name, "get_snapcontext")
            objectPrefix = read.call(RBDClass.name, "get_object_prefix")
            createTime = read.call(RBDClass.name, "get_create_timestamp")
            accessTime = read.call(RBDClass.name, "get_access_timestamp")
            modifyTime = read.call(RBDClass.name, "get_modify_timestamp")
            parent = read.call(RBDClass.name, "parent_get")
            parentOverlap = read.call(RBDClass.name, "parent_overlap_get", input: head)
        }

        func decode(_ read: ObjectClassRead) throws -> Header {
            var sizeReply = try RBDClass.decoder(read, size, "get_size")
            let order = try sizeReply.u8("order")
            let imageSize = try sizeReply.u64("size")
            guard (12...63).contains(order) else {
                throw CephDecodingError(description: "get_size: order \(order)")
            }

            var featuresReply = try RBDClass.decoder(read, features, "get_features")
            let imageFeatures = try featuresReply.u64("features")

            var flagsReply = try RBDClass.decoder(read, flags, "get_flags")
            var contextReply = try RBDClass.decoder(read, snapshotContext, "get_snapcontext")
            _ = try contextReply.u64("snapshot sequence")
            let snapshotIDs = try contextReply.array("snapshot ids") { try $0.u64("snapshot id") }
            var prefixReply = try RBDClass.decoder(read, objectPrefix, "get_object_prefix")

            var parentReply = try RBDClass.decoder(read, parent, "parent_get")
            let spec = try parentReply.structure("parent image spec", known: 1) { fields, _ in
                ParentSpec(poolID: try fields.i64("pool id"), namespace: try fields.string("namespace"),
                           imageID: try fields.string("image id"), snapshotID: try fields.u64("snapshot id"))
            }
            var overlapReply = try RBDClass.decoder(read, parentOverlap, "parent_overlap_get")

            return Header(
                order: Int(order), size: imageSize, features: imageFeatures, flags: try flagsReply.u64("flags"),
                snapshotIDs: snapshotIDs, objectPrefix: try prefixReply.string("object prefix"),
                createTime: try RBDClass.timestamp(read, createTime, "get_create_timestamp"),
                accessTime: try RBDClass.timestamp(read, accessTime, "get_access_timestamp"),
                modifyTime: try RBDClass.timestamp(read, modifyTime, "get_modify_timestamp"),
                parent: spec.poolID < 0 ? nil : spec,
                parentOverlap: try overlapReply.optional("overlap") { try $0.u64("overlap") })
        }
    }

    // MARK: Snapshots

    /// One snapshot, of any namespace.
    struct Snapshot {
        var id: UInt64
        var namespaceType: UInt32
        var name: String
        var size: UInt64
        var timestamp: Timestamp
        var flags: UInt64
        var protectionStatus: UInt8
        /// How many clone v2 children the snapshot has (`children_list` names them).
        var childCount: UInt32
    }

    /// `snapshot_get` for each snapshot, with what librbd reads beside it: `get_flags` and
    /// `get_protection_status`.
    struct SnapshotCalls {
        private let calls: [(id: UInt64, info: Int, flags: Int, protection: Int)]

        init(adding read: ObjectClassRead, ids: [UInt64]) {
            calls = ids.map { id in
                let input = CephEncoder.encoding { $0.u64(id) }
                return (id, read.call(RBDClass.name, "snapshot_get", input: input),
                        read.call(RBDClass.name, "get_flags", input: input),
                        read.call(RBDClass.name, "get_protection_status", input: input))
            }
        }

        func decode(_ read: ObjectClassRead) throws -> [Snapshot] {
            try calls.map { call in
                var snapshot = try RBDClass.decodeSnapshot(read, call.info, id: call.id)
                var flags = try RBDClass.decoder(read, call.flags, "get_flags")
                snapshot.flags = try flags.u64("flags")
                var protection = try RBDClass.decoder(read, call.protection, "get_protection_status")
                snapshot.protectionStatus = try protection.u8("protection status")
                return snapshot
            }
        }
    }

    /// The reply of `snapshot_get` (`cls::rbd::SnapshotInfo`); `flags` and `protectionStatus` are left 0.
    static func decodeSnapshot(_ read: ObjectClassRead, _ index: Int, id: UInt64) throws -> Snapshot {
        var info = try RBDClass.decoder(read, index, "snapshot_get")
        let snapshot = try info.structure("snapshot info", known: 1) { fields, _ in
            let found = try fields.u64("id")
            let namespaceType = try fields.structure("snapshot namespace", known: 1) { namespace, _ in
                try namespace.u32("namespace type")
            }
            return Snapshot(
                id: found, namespaceType: namespaceType, name: try fields.string("name"),
                size: try fields.u64("image size"), timestamp: try RBDClass.timestamp(&fields, "timestamp"),
                flags: 0, protectionStatus: 0, childCount: try fields.u32("child count"))
        }
        guard snapshot.id == id else {
            throw CephDecodingError(description: "snapshot_get \(id): answered \(snapshot.id)")
        }
        return snapshot
    }

    /// `snapshot_get` alone: a snapshot's name (any namespace), e.g. a clone's parent snapshot.
    static func addSnapshotNameLookup(_ read: ObjectClassRead, id: UInt64) -> Int {
        read.call(RBDClass.name, "snapshot_get", input: CephEncoder.encoding { $0.u64(id) })
    }

    static func decodeSnapshotName(_ read: ObjectClassRead, _ index: Int, id: UInt64) throws -> String {
        var info = try RBDClass.decoder(read, index, "snapshot_get")
        return try info.structure("snapshot info", known: 1) { fields, _ in
            let found = try fields.u64("id")
            guard found == id else {
                throw CephDecodingError(description: "snapshot_get \(id): answered \(found)")
            }
            _ = try fields.structure("snapshot namespace", known: 1) { _, _ in () }
            return try fields.string("name")
        }
    }

    // MARK: Snapshot details

    /// What `describeSnapshots` reads of an image's header beside each snapshot's object map: the image's
    /// order and features, and per snapshot what `SnapshotDetailCalls` answers.
    struct SnapshotDetailHeader {
        var order: Int
        var features: UInt64
        /// Per snapshot id: its `snapshot_get`, its flags and its clone v2 children; none where one of them
        /// failed (a snapshot removed since it was listed, or a reply that does not decode).
        var snapshots: [UInt64: SnapshotDetail]
    }

    struct SnapshotDetail {
        var snapshot: Snapshot
        var flags: UInt64
        var children: [ChildSpec]
    }

    /// A clone v2 child of a snapshot (`cls::rbd::ChildImageSpec`).
    struct ChildSpec: Hashable {
        var poolID: Int64
        var namespace: String
        var imageID: String
    }

    /// Where each call of a `SnapshotDetailHeader` read is in the operation (on `rbd_header.<id>`).
    struct SnapshotDetailCalls {
        private let size, features: Int
        private let calls: [(id: UInt64, info: Int, flags: Int, children: Int)]

        /// The head's size and features may not fail (a missing header fails the whole read); each
        /// snapshot's calls may, on their own.
        init(adding read: ObjectClassRead, ids: [UInt64]) {
            let head = CephEncoder.encoding { $0.u64(RBDClass.head) }
            size = read.call(RBDClass.name, "get_size", input: head)
            features = read.call(RBDClass.name, "get_features", input: CephEncoder.encoding {
                $0.u64(RBDClass.head)
                $0.bool(true)
            })
            calls = ids.map { id in
                let input = CephEncoder.encoding { $0.u64(id) }
                return (id, read.call(RBDClass.name, "snapshot_get", input: input, mayFail: true),
                        read.call(RBDClass.name, "get_flags", input: input, mayFail: true),
                        read.call(RBDClass.name, "children_list", input: input, mayFail: true))
            }
        }

        func decode(_ read: ObjectClassRead) throws -> SnapshotDetailHeader {
            var sizeReply = try RBDClass.decoder(read, size, "get_size")
            let order = try sizeReply.u8("order")
            guard (12...63).contains(order) else {
                throw CephDecodingError(description: "get_size: order \(order)")
            }
            var featuresReply = try RBDClass.decoder(read, features, "get_features")
            let imageFeatures = try featuresReply.u64("features")
            var snapshots: [UInt64: SnapshotDetail] = [:]
            for call in calls {
                // One that fails is left out: that snapshot is opened instead.
                snapshots[call.id] = try? SnapshotDetail(
                    snapshot: RBDClass.decodeSnapshot(read, call.info, id: call.id),
                    flags: RBDClass.decoder(read, call.flags, "get_flags").u64Value("flags"),
                    children: RBDClass.decodeChildren(read, call.children))
            }
            return SnapshotDetailHeader(order: Int(order), features: imageFeatures, snapshots: snapshots)
        }
    }

    /// The reply of `children_list`: a set of `cls::rbd::ChildImageSpec`. ENOENT and EOPNOTSUPP mean none,
    /// as librbd takes them.
    private static func decodeChildren(_ read: ObjectClassRead, _ index: Int) throws -> [ChildSpec] {
        if case .failure(let code) = read.reply(index), code.value == -ENOENT || code.value == -EOPNOTSUPP {
            return []
        }
        var reply = try RBDClass.decoder(read, index, "children_list")
        return try reply.array("children") { element in
            try element.structure("child image spec", known: 2) { fields, version in
                let poolID = try fields.i64("pool id")
                let imageID = try fields.string("image id")
                return ChildSpec(poolID: poolID, namespace: version >= 2 ? try fields.string("namespace") : "",
                                 imageID: imageID)
            }
        }
    }

    /// `get_children` on `rbd_children`: the ids of the clone v1 children, in the pool (and namespace) of
    /// the object, of one parent snapshot. ENOENT when it has none there.
    static func addV1ChildrenLookup(_ read: ObjectClassRead, parentPoolID: Int64, parentImageID: String,
                                    snapshotID: UInt64) -> Int {
        read.call(RBDClass.name, "get_children", input: CephEncoder.encoding {
            $0.i64(parentPoolID)
            $0.string(parentImageID)
            $0.u64(snapshotID)
        }, mayFail: true)
    }

    /// The reply of `get_children`: a set of strings.
    static func decodeStringSet(_ reply: [UInt8]) throws -> [String] {
        var decoder = CephDecoder(reply)
        return try decoder.array("image ids") { try $0.string("image id") }
    }

    /// `trash_get` on `rbd_trash`: an image in the trash, by id; ENOENT for one that is not there.
    static func addTrashLookup(_ read: ObjectClassRead, id: String) -> Int {
        read.call(RBDClass.name, "trash_get", input: CephEncoder.encoding { $0.string(id) }, mayFail: true)
    }

    /// `RBD_TRASH_IMAGE_SOURCE_REMOVING`: an image being removed, which librbd does not count as in the trash.
    static let trashSourceRemoving: UInt8 = 3

    /// The start of a `cls::rbd::TrashImageSpec`: why the image is in the trash, and its name.
    static func decodeTrashEntry(_ reply: [UInt8]) throws -> (source: UInt8, name: String) {
        var decoder = CephDecoder(reply)
        return try decoder.structure("trash image spec", known: 2) { fields, _ in
            (try fields.u8("source"), try fields.string("name"))
        }
    }

    // MARK: Object map

    /// `object_map_load` on `rbd_object_map.<id>` (the head's object map).
    static func addObjectMapLoad(_ read: ObjectClassRead) -> Int {
        read.call(RBDClass.name, "object_map_load")
    }

    /// Object states in an object map (`include/rbd/object_map_types.h`).
    enum ObjectState: UInt8 {
        case nonexistent = 0, exists = 1, pending = 2, existsClean = 3
    }

    /// An object map: a `BitVector<2>` (`common/bit_vector.hpp`): a byte list holding a versioned header
    /// with the entry count, then the entries, four to a byte, the first in the two high bits, then a
    /// byte list of checksums (`object_map_load` leaves them out).
    struct ObjectMap {
        let entryCount: UInt64
        private let entries: ArraySlice<UInt8>

        init(decoding reply: [UInt8]) throws {
            var decoder = CephDecoder(reply)
            var header = CephDecoder(Array(try decoder.byteList("object map header")))
            entryCount = try header.structure("object map header", known: 1) { fields, _ in
                try fields.u64("entry count")
            }
            entries = try decoder.raw(entryCount / 4 + (entryCount % 4 == 0 ? 0 : 1), "object map entries")
            _ = try decoder.byteList("object map footer")
        }

        func state(_ object: UInt64) -> UInt8 {
            let byte = entries[entries.startIndex + Int(object / 4)]
            return byte >> ((3 - UInt8(object % 4)) * 2) & 0b11
        }

        /// What `rbd_diff_iterate2(image, nil, 0, size, include_parent: 0, whole_object: 1)` reports as data
        /// with fast-diff, added up: every object that exists (clean or not), clipped to the image's end. nil
        /// when the map does not cover the image, or an object is pending (being removed).
        func usedBytes(size: UInt64, objectSize: UInt64) -> UInt64? {
            let objectCount = size / objectSize + (size % objectSize == 0 ? 0 : 1)
            guard objectCount <= entryCount else { return nil }
            var used: UInt64 = 0
            var object: UInt64 = 0
            while object < objectCount {
                // Whole bytes of nonexistent objects first: most of a sparse map.
                if object % 4 == 0, objectCount - object >= 4,
                   entries[entries.startIndex + Int(object / 4)] == 0 {
                    object += 4
                    continue
                }
                switch ObjectState(rawValue: state(object))! {
                case .nonexistent:
                    break
                case .exists, .existsClean:
                    used += min(objectSize, size - object * objectSize)
                case .pending:
                    return nil
                }
                object += 1
            }
            return used
        }
    }

    // MARK: Replies

    /// A decoder of call `index`'s reply; throws its error if the call failed.
    private static func decoder(_ read: ObjectClassRead, _ index: Int, _ method: String) throws -> CephDecoder {
        switch read.reply(index) {
        case .success(let bytes):
            return CephDecoder(bytes)
        case .failure(let code):
            throw CephDecodingError(description: "\(method): error \(code.value)")
        }
    }

    private static func timestamp(_ read: ObjectClassRead, _ index: Int, _ method: String) throws -> Timestamp {
        var reply = try RBDClass.decoder(read, index, method)
        return try RBDClass.timestamp(&reply, method)
    }

    private static func timestamp(_ decoder: inout CephDecoder, _ what: String) throws -> Timestamp {
        let time = try decoder.time(what)
        return Timestamp(seconds: Int64(time.seconds), nanoseconds: Int64(time.nanoseconds))
    }
}
