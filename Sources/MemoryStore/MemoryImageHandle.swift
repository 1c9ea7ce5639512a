import Dispatch
import Storage
import SystemPackage

/// An open image head or snapshot of a `MemoryStore`. It refers to the image by id, as librbd does, so it
/// keeps working across renames; once the image (or its snapshot) is removed, calls fail with ENOENT.
final class MemoryImageHandle: ImageHandle, @unchecked Sendable {
    let store: MemoryStore
    /// The key of this handle's watcher and update handlers in the store.
    let serial: UInt64
    let imageID: String
    let spec: ImageSpec
    let snapshot: String?
    let snapshotID: UInt64?
    let isReadOnly: Bool
    /// The image's queue, shared by all its handles, so that completions of one image never overlap.
    let completionQueue: DispatchQueue

    init(store: MemoryStore, serial: UInt64, imageID: String, spec: ImageSpec, snapshot: String?,
         snapshotID: UInt64?, isReadOnly: Bool, completionQueue: DispatchQueue) {
        self.store = store
        self.serial = serial
        self.imageID = imageID
        self.spec = spec
        self.snapshot = snapshot
        self.snapshotID = snapshotID
        self.isReadOnly = isReadOnly
        self.completionQueue = completionQueue
    }

    /// `pool/ns/image@snap`, the target of this handle's errors.
    var target: String { spec.describing(snapshot: snapshot) }

    // MARK: Metadata

    func info() throws -> ImageInfo {
        try store.locked {
            let operation = "rbd_stat"
            let (image, snapshot) = try store.beginHandleCall(self, operation)
            return try store.imageInfo(image, snapshot: snapshot, operation: operation, target: target)
        }
    }

    func size() throws -> UInt64 {
        try store.locked {
            let (image, snapshot) = try store.beginHandleCall(self, "rbd_get_size")
            return snapshot?.size ?? image.size
        }
    }

    func snapshots() throws -> [SnapshotInfo] {
        try store.locked {
            try store.beginHandleCall(self, "rbd_snap_list").image.snapshots.map(store.snapshotInfo)
        }
    }

    // MARK: Asynchronous I/O

    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
              completion: @escaping @Sendable (Result<Int, StorageError>) -> Void) {
        let destination = UncheckedBuffer(pointer: buffer)
        submit("rbd_aio_read", completion: completion) { store in
            try store.performRead(self, at: offset, into: destination.pointer)
        }
    }

    func write(at offset: UInt64, from data: UnsafeRawBufferPointer,
               completion: @escaping @Sendable (Result<Void, StorageError>) -> Void) {
        let bytes = copiedBytes(data)  // copied now: the caller may reuse its buffer as soon as this returns
        submit("rbd_aio_write", completion: completion) { store in
            try store.performWrite(self, at: offset, bytes: bytes)
        }
    }

    func discard(at offset: UInt64, length: UInt64,
                 completion: @escaping @Sendable (Result<Void, StorageError>) -> Void) {
        submit("rbd_aio_discard", completion: completion) { store in
            try store.performZeroing(self, at: offset, length: length, operation: "rbd_aio_discard",
                                     zeroPartialObjects: false)
        }
    }

    func writeZeroes(at offset: UInt64, length: UInt64,
                     completion: @escaping @Sendable (Result<Void, StorageError>) -> Void) {
        submit("rbd_aio_write_zeroes", completion: completion) { store in
            try store.performZeroing(self, at: offset, length: length, operation: "rbd_aio_write_zeroes",
                                     zeroPartialObjects: true)
        }
    }

    /// Completes after every earlier I/O of the image: they run on the same serial queue, in order.
    func flush(completion: @escaping @Sendable (Result<Void, StorageError>) -> Void) {
        submit("rbd_aio_flush", completion: completion) { store in
            _ = try store.openedImage(self, operation: "rbd_aio_flush")
        }
    }

    /// Counts the call and takes its fault at issue time (so counts and faults are deterministic), then runs
    /// the work and the completion on the image's queue, or inline when the store completes synchronously.
    private func submit<T>(_ operation: String, completion: @escaping @Sendable (Result<T, StorageError>) -> Void,
                           work: @escaping (MemoryStore) throws -> T) {
        let (injected, synchronous): (StorageError?, Bool) = store.locked {
            store.checkOpen(self)
            do {
                try store.beginCall(operation, spec: spec, target: target)
                return (nil, store.synchronousCompletions)
            } catch {
                return (error as? StorageError, store.synchronousCompletions)
            }
        }
        let run = UncheckedWork { [store, target] in
            let result: Result<T, StorageError>
            if let injected {
                result = .failure(injected)
            } else {
                result = store.catching(operation: operation, target: target) {
                    try store.locked { try work(store) }
                }
            }
            completion(result)
        }
        if synchronous {
            run.body()
        } else {
            completionQueue.async { run.body() }
        }
    }

    // MARK: Synchronous changes

    func resize(to size: UInt64) throws {
        try store.locked { try store.performResize(self, to: size) }
    }

    func allocatedExtents(in range: Range<UInt64>) throws -> [Range<UInt64>] {
        try store.locked {
            let operation = "rbd_diff_iterate2"
            let (image, snapshot) = try store.beginHandleCall(self, operation)
            let version = snapshot.map(image.version(of:)) ?? image.headVersion
            return try store.allocatedExtents(of: version, in: range, operation: operation, target: target)
        }
    }

    /// Own objects only, as `rbd du` (diff-iterate without the parent) counts them.
    func children() throws -> [ImageSpec] {
        try store.locked {
            let (image, snapshot) = try store.beginHandleCall(self, "rbd_list_children3")
            guard let snapshot else { return [] }
            return store.children(ofImage: image.id, snapshotID: snapshot.id)
        }
    }

    func ownsExclusiveLock() throws -> Bool? {
        try store.locked {
            let (image, _) = try store.beginHandleCall(self, "rbd_is_exclusive_lock_owner")
            guard image.features & RBDFeature.exclusiveLock != 0 else { return nil }
            return image.lockOwner == serial
        }
    }

    func isLockedByAnotherClient() throws -> Bool {
        try store.locked {
            let (image, _) = try store.beginHandleCall(self, "rbd_lock_get_owners")
            return image.lockOwner.map { $0 != serial } ?? false
        }
    }

    func usedBytes() throws -> UInt64 {
        try store.locked {
            let operation = "rbd_diff_iterate2"
            let (image, snapshot) = try store.beginHandleCall(self, operation)
            return (snapshot.map(image.version(of:)) ?? image.headVersion).ownUsedBytes
        }
    }

    func createSnapshot(_ name: String) throws {
        try store.locked { try store.performCreateSnapshot(self, name: name) }
    }

    func removeSnapshot(_ name: String) throws {
        try store.locked { try store.performRemoveSnapshot(self, name: name) }
    }

    func renameSnapshot(_ name: String, to newName: String) throws {
        try store.locked { try store.performRenameSnapshot(self, name: name, to: newName) }
    }

    func protectSnapshot(_ name: String) throws {
        try store.locked { try store.performSetProtection(self, name: name, protect: true) }
    }

    func unprotectSnapshot(_ name: String) throws {
        try store.locked { try store.performSetProtection(self, name: name, protect: false) }
    }

    func flatten(progress: (@Sendable (UInt64, UInt64) -> Void)?) throws {
        try store.performFlatten(self, progress: progress)
    }

    // MARK: Watches and closing

    func watchUpdates(_ handler: @escaping @Sendable () -> Void) throws {
        try store.locked {
            let operation = "rbd_update_watch"
            _ = try store.beginHandleCall(self, operation)
            store.openHandles[serial]!.updateHandlers.append(handler)
        }
    }

    /// Like `rbd_close`, waits for the handle's in-flight I/O first; so never call it from a completion.
    func close() {
        let synchronous: Bool = store.locked {
            store.checkOpen(self)
            store.calls["rbd_close", default: 0] += 1
            store.openHandles[serial] = nil
            return store.synchronousCompletions
        }
        if !synchronous {
            dispatchPrecondition(condition: .notOnQueue(completionQueue))
            completionQueue.sync {}
        }
    }
}

/// A caller's read buffer, handed to the queue that fills it (the protocol keeps it valid until completion).
struct UncheckedBuffer: @unchecked Sendable {
    let pointer: UnsafeMutableRawBufferPointer
}

/// Work for an image queue; it touches the store only under its lock.
struct UncheckedWork: @unchecked Sendable {
    let body: () -> Void
}
