import Storage

/// The methods of the OSDs' `rbd` object class (`cls_rbd`) that `describeImages` reads image metadata
/// with, without opening images: what they take and what they answer, as Ceph Pacific encodes them.
/// librbd reads the same when it opens an image (`image::OpenRequest`, `image::RefreshRequest`).
enum RBDClass {
    static let name = "rbd"
    /// `CEPH_NOSNAP`: the image's head rather than a snapshot.
    static let head: UInt64 = UInt64.max - 1

    static let directoryObject = "rbd_directory"
    static func headerObject(id: String) -> String { "rbd_header.\(id)" }
    static func objectMapObject(id: String) -> String { "rbd_object_map.\(id)" }

    /// `RBD_PROTECTION_STATUS_PROTECTED`.
    static let protectedStatus: UInt8 = 2
    /// `SNAPSHOT_NAMESPACE_TYPE_USER`.
    static let userSnapshotNamespace: UInt32 = 0

    // MARK: Directory

    /// `dir_get_id`: an image's id by name, from `rbd_directory`; ENOENT for no such (format 2) image.
    static func addIDLookup(_ read: ObjectClassRead, name imageName: String) -> Int {
        read.call(RBDClass.name, "dir_get_id", input: CephEncoder.encoding { $0.string(imageName) }, mayFail: true)
    }

    /// `dir_get_name`: an image's name by id, from `rbd_directory`.
    static func addNameLookup(_ read: ObjectClassRead, id: String) -> Int {
        read.call(RBDClass.name, "dir_get_name", input: CephEncoder.encoding { $0.string(id) })
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
                var info = try RBDClass.decoder(read, call.info, "snapshot_get")
                var snapshot = try info.structure("snapshot info", known: 1) { fields, _ in
                    let id = try fields.u64("id")
                    let namespaceType = try fields.structure("snapshot namespace", known: 1) { namespace, _ in
                        try namespace.u32("namespace type")
                    }
                    return Snapshot(
                        id: id, namespaceType: namespaceType, name: try fields.string("name"),
                        size: try fields.u64("image size"), timestamp: try RBDClass.timestamp(&fields, "timestamp"),
                        flags: 0, protectionStatus: 0)
                }
                guard snapshot.id == call.id else {
                    throw CephDecodingError(description: "snapshot_get \(call.id): answered \(snapshot.id)")
                }
                var flags = try RBDClass.decoder(read, call.flags, "get_flags")
                snapshot.flags = try flags.u64("flags")
                var protection = try RBDClass.decoder(read, call.protection, "get_protection_status")
                snapshot.protectionStatus = try protection.u8("protection status")
                return snapshot
            }
        }
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
