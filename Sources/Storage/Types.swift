import SystemPackage

/// Where an image lives: pool, RBD namespace ("" is the pool's default namespace) and image name.
public struct ImageSpec: Hashable, Sendable, CustomStringConvertible {
    public var pool: String
    public var namespace: String
    public var name: String

    public init(pool: String, namespace: String = "", name: String) {
        self.pool = pool
        self.namespace = namespace
        self.name = name
    }

    /// `pool/name` or `pool/ns/name`, as the `rbd` CLI writes it.
    public var description: String {
        namespace.isEmpty ? "\(pool)/\(name)" : "\(pool)/\(namespace)/\(name)"
    }

    /// `pool/name@snap` (or `pool/name` for nil).
    public func describing(snapshot: String?) -> String {
        snapshot.map { "\(description)@\($0)" } ?? description
    }
}

/// A point in time as librbd reports it (`struct timespec`).
public struct Timestamp: Hashable, Sendable, Comparable {
    public var seconds: Int64
    public var nanoseconds: Int64

    public init(seconds: Int64, nanoseconds: Int64 = 0) {
        self.seconds = seconds
        self.nanoseconds = nanoseconds
    }

    public static let zero = Timestamp(seconds: 0)

    public static func < (a: Timestamp, b: Timestamp) -> Bool {
        (a.seconds, a.nanoseconds) < (b.seconds, b.nanoseconds)
    }
}

public struct PoolInfo: Hashable, Sendable {
    public var name: String
    public var id: Int64
    /// True when the pool has the `rbd` application enabled (what `rbd pool init` does).
    public var isRBD: Bool

    public init(name: String, id: Int64, isRBD: Bool) {
        self.name = name
        self.id = id
        self.isRBD = isRBD
    }
}

/// The parent of a clone: which snapshot it was cloned from and how much of it still shows through.
public struct ParentInfo: Hashable, Sendable {
    public var image: ImageSpec
    public var snapshot: String
    public var overlap: UInt64

    public init(image: ImageSpec, snapshot: String, overlap: UInt64) {
        self.image = image
        self.snapshot = snapshot
        self.overlap = overlap
    }
}

/// What `rbd info` says of an image (or of a snapshot of it, when opened at one).
public struct ImageInfo: Hashable, Sendable {
    public var id: String
    public var size: UInt64
    public var objectSize: UInt64
    /// log2 of the object size.
    public var order: Int
    public var features: UInt64
    /// `RBD_FLAG_*` bits (object map / fast-diff validity).
    public var flags: UInt64
    public var format: Int
    public var blockNamePrefix: String
    public var createTime: Timestamp
    public var modifyTime: Timestamp
    public var accessTime: Timestamp
    public var parent: ParentInfo?

    public init(
        id: String, size: UInt64, objectSize: UInt64, order: Int, features: UInt64, flags: UInt64 = 0,
        format: Int = 2, blockNamePrefix: String, createTime: Timestamp, modifyTime: Timestamp,
        accessTime: Timestamp, parent: ParentInfo? = nil
    ) {
        self.id = id
        self.size = size
        self.objectSize = objectSize
        self.order = order
        self.features = features
        self.flags = flags
        self.format = format
        self.blockNamePrefix = blockNamePrefix
        self.createTime = createTime
        self.modifyTime = modifyTime
        self.accessTime = accessTime
        self.parent = parent
    }
}

/// A user snapshot of an image (trash and mirror snapshots are never reported).
public struct SnapshotInfo: Hashable, Sendable {
    public var id: UInt64
    public var name: String
    public var size: UInt64
    public var timestamp: Timestamp
    public var isProtected: Bool

    public init(id: UInt64, name: String, size: UInt64, timestamp: Timestamp, isProtected: Bool) {
        self.id = id
        self.name = name
        self.size = size
        self.timestamp = timestamp
        self.isProtected = isProtected
    }
}

/// An image and its snapshots, as one listing needs them.
public struct ImageSummary: Hashable, Sendable {
    public var info: ImageInfo
    public var snapshots: [SnapshotInfo]
    /// Bytes the image holds itself, as `rbd du` reports (nil when it could not be found out).
    public var usedBytes: UInt64?

    public init(info: ImageInfo, snapshots: [SnapshotInfo], usedBytes: UInt64? = nil) {
        self.info = info
        self.snapshots = snapshots
        self.usedBytes = usedBytes
    }
}

/// A user snapshot as a listing found it (`BlockStore.describeImages`): enough to find its details
/// without opening it.
public struct SnapshotReference: Hashable, Sendable, CustomStringConvertible {
    public var image: ImageSpec
    /// The image's id (`ImageInfo.id`).
    public var imageID: String
    public var snapshot: SnapshotInfo

    public init(image: ImageSpec, imageID: String, snapshot: SnapshotInfo) {
        self.image = image
        self.imageID = imageID
        self.snapshot = snapshot
    }

    /// `pool/image@snap`.
    public var description: String { image.describing(snapshot: snapshot.name) }
}

/// What a listing shows of a snapshot beyond its `SnapshotInfo`: its link count and its blocks.
public struct SnapshotDetails: Hashable, Sendable {
    /// Its clones, as `BlockStore.children(of:snapshot:)` lists them (clones in the trash left out).
    public var children: [ImageSpec]
    /// The bytes it holds, as `ImageHandle.usedBytes()` of a handle open at it reports them.
    public var usedBytes: UInt64

    public init(children: [ImageSpec], usedBytes: UInt64) {
        self.children = children
        self.usedBytes = usedBytes
    }
}

/// How a new image is made. nil means "the cluster's default" (`rbd_default_features`, 4 MiB objects).
public struct ImageCreateOptions: Hashable, Sendable {
    public var objectSize: UInt64?
    public var features: UInt64?

    public init(objectSize: UInt64? = nil, features: UInt64? = nil) {
        self.objectSize = objectSize
        self.features = features
    }
}

/// Capacity and use, in bytes, of the cluster or of one pool.
public struct StorageStats: Hashable, Sendable {
    public var totalBytes: UInt64
    public var usedBytes: UInt64
    public var availableBytes: UInt64
    public var objects: UInt64

    public init(totalBytes: UInt64, usedBytes: UInt64, availableBytes: UInt64, objects: UInt64) {
        self.totalBytes = totalBytes
        self.usedBytes = usedBytes
        self.availableBytes = availableBytes
        self.objects = objects
    }
}

/// A failed storage call: the errno the backend returned, the call, and what it was called on.
public struct StorageError: Error, Hashable, Sendable, CustomStringConvertible {
    public var errno: Errno
    /// The backend call, e.g. `rbd_open`, `rbd_aio_write`.
    public var operation: String
    /// The pool, image or snapshot the call was about, e.g. `images/foo@snap`.
    public var target: String

    public init(_ errno: Errno, operation: String, target: String) {
        self.errno = errno
        self.operation = operation
        self.target = target
    }

    public var description: String { "\(operation) on \(target): \(errno) (\(errno.rawValue))" }
}
