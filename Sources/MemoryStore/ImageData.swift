import Dispatch
import Storage

// The in-memory model of RBD images. Every type here is guarded by `MemoryStore`'s lock.
//
// Data is sparse, keyed by object number, like RADOS objects named `rbd_data.<id>.<objectno>`: a 10 GiB
// thin image holds no objects at all. An object's bytes may be shorter than the object size (RADOS objects
// have a length; bytes past it read as zeros), and an object of length 0 still exists: in a clone it hides
// the parent's data, as librbd's truncate-instead-of-remove does.
//
// Snapshots freeze data copy-on-write for free: a snapshot keeps a copy of the head's object dictionary,
// and Swift's value semantics copy a dictionary or an object's bytes only when the head next changes them.

/// One RADOS data object of an image.
struct StoredObject {
    var bytes: [UInt8]
    /// A store-wide counter bumped on every change, so pool statistics can tell an object a snapshot shares
    /// with the head (same generation) from a copy-on-write copy (different generation).
    var generation: UInt64
}

/// Which snapshot of which image a clone reads through, and up to where.
struct ParentLink: Equatable {
    var imageID: String
    var snapshotID: UInt64
    /// Bytes of the parent snapshot that still show through: the snapshot's size at clone time, reduced by
    /// shrinking the clone and never grown again.
    var overlap: UInt64
}

struct SnapshotRecord {
    var id: UInt64
    var name: String
    var size: UInt64
    var timestamp: Timestamp
    var isProtected: Bool
    var objects: [UInt64: StoredObject]
    /// The image's parent when the snapshot was taken (a later flatten detaches only the head).
    var parent: ParentLink?
}

final class ImageRecord {
    let id: String
    var location: ImageSpec
    var size: UInt64
    let objectSize: UInt64
    let features: UInt64
    let createTime: Timestamp
    var modifyTime: Timestamp
    var accessTime: Timestamp
    var objects: [UInt64: StoredObject] = [:]
    var parent: ParentLink?
    /// Oldest first (snapshot ids only grow).
    var snapshots: [SnapshotRecord] = []
    /// The handle (its serial) holding the exclusive lock: the last one that changed the image, as librbd's
    /// lock moves to whichever client writes.
    var lockOwner: UInt64?
    /// Runs the I/O and completions of this image one at a time, in the order they were issued, as
    /// librbd's completions of one image never run concurrently.
    let completionQueue: DispatchQueue

    init(id: String, location: ImageSpec, size: UInt64, objectSize: UInt64, features: UInt64,
         parent: ParentLink?, now: Timestamp) {
        self.id = id
        self.location = location
        self.size = size
        self.objectSize = objectSize
        self.features = features
        self.createTime = now
        self.modifyTime = now
        self.accessTime = now
        self.parent = parent
        self.completionQueue = DispatchQueue(label: "MemoryStore.image.\(id)")
    }

    var order: Int { objectSize.trailingZeroBitCount }

    func snapshot(named name: String) -> SnapshotRecord? {
        snapshots.first { $0.name == name }
    }

    func snapshotIndex(id: UInt64) -> Int? {
        snapshots.firstIndex { $0.id == id }
    }

    /// The head's data as a read-only version.
    var headVersion: DataVersion {
        DataVersion(objects: objects, objectSize: objectSize, size: size, parent: parent)
    }

    func version(of snapshot: SnapshotRecord) -> DataVersion {
        DataVersion(objects: snapshot.objects, objectSize: objectSize, size: snapshot.size,
                    parent: snapshot.parent)
    }
}

/// The data of an image head or snapshot, as reads and extent queries see it.
struct DataVersion {
    var objects: [UInt64: StoredObject]
    var objectSize: UInt64
    var size: UInt64
    var parent: ParentLink?

    /// Bytes of own objects inside the image, the last object counted up to the image end (`rbd du`).
    var ownUsedBytes: UInt64 {
        objects.keys.reduce(0) { total, objectNumber in
            let start = objectNumber * objectSize
            return start < size ? total + min(objectSize, size - start) : total
        }
    }

    /// Own objects that intersect `range`, as byte ranges clipped to it (unordered).
    func ownExtents(in range: Range<UInt64>) -> [Range<UInt64>] {
        guard !range.isEmpty else { return [] }
        let first = range.lowerBound / objectSize
        let last = (range.upperBound - 1) / objectSize
        return objects.keys.compactMap { objectNumber in
            guard objectNumber >= first, objectNumber <= last else { return nil }
            return clipped(objectRange(objectNumber), to: range)
        }
    }

    func objectRange(_ objectNumber: UInt64) -> Range<UInt64> {
        let start = objectNumber * objectSize
        return start..<(start + objectSize)
    }
}

func clipped(_ range: Range<UInt64>, to bounds: Range<UInt64>) -> Range<UInt64>? {
    let lower = max(range.lowerBound, bounds.lowerBound)
    let upper = min(range.upperBound, bounds.upperBound)
    return lower < upper ? lower..<upper : nil
}

/// Sorts extents and joins those that touch or overlap.
func merged(_ extents: [Range<UInt64>]) -> [Range<UInt64>] {
    var result: [Range<UInt64>] = []
    for extent in extents.sorted(by: { $0.lowerBound < $1.lowerBound }) {
        if let last = result.last, extent.lowerBound <= last.upperBound {
            result[result.count - 1] = last.lowerBound..<max(last.upperBound, extent.upperBound)
        } else {
            result.append(extent)
        }
    }
    return result
}

/// One object's share of a byte range: which object, where in it, and where in the caller's buffer.
struct ObjectPiece {
    var objectNumber: UInt64
    var offsetInObject: UInt64
    var length: UInt64
    /// Offset of this piece from the start of the whole range.
    var offsetInRange: UInt64
}

/// Splits `offset..<offset+length` at object boundaries.
func objectPieces(offset: UInt64, length: UInt64, objectSize: UInt64) -> [ObjectPiece] {
    var pieces: [ObjectPiece] = []
    var position = offset
    let end = offset + length
    while position < end {
        let offsetInObject = position % objectSize
        let pieceLength = min(objectSize - offsetInObject, end - position)
        pieces.append(ObjectPiece(objectNumber: position / objectSize, offsetInObject: offsetInObject,
                                  length: pieceLength, offsetInRange: position - offset))
        position += pieceLength
    }
    return pieces
}
