import Foundation
internal import CRBD
import Logging
import Storage

/// An open RBD image or snapshot. librbd's image handle is thread-safe, so one `CephImage` serves every
/// open file of the image.
///
/// A read-write handle (`rbd_open`) registers a watch on the image header: other clients' changes
/// (resize, snapshots) reach `info()`, `size()` and `watchUpdates`, and `rbd_remove` answers EBUSY while it
/// is open. A read-only handle (`rbd_open_read_only`) has no watch: it does not block removal, and it
/// keeps the metadata it loaded at open (a snapshot's never changes; a head's may go stale).
public final class CephImage: ImageHandle, @unchecked Sendable {
    public let spec: ImageSpec
    public let snapshot: String?
    public let isReadOnly: Bool
    private let image: RawImage
    private let logger: Logger

    private let lock = NSLock()
    /// Guarded by `lock`.
    private var isClosed = false
    /// Registered update watches and their handlers, released at close. Guarded by `lock`.
    private var watches: [UInt64: Unmanaged<UpdateHandler>] = [:]

    /// Opens `spec` at `snapshot` (read-only) or its head. The corresponding C functions are `rbd_open` and
    /// `rbd_open_read_only`.
    init(opening spec: ImageSpec, snapshot: String?, readOnly: Bool, in io: IOContext, logger: Logger) throws {
        let readOnly = readOnly || snapshot != nil
        var handle: rbd_image_t?
        if readOnly {
            try check(rbd_open_read_only(io.raw, spec.name, &handle, snapshot), "rbd_open_read_only",
                      spec.describing(snapshot: snapshot))
        } else {
            try check(rbd_open(io.raw, spec.name, &handle, nil), "rbd_open", spec.description)
        }
        self.spec = spec
        self.snapshot = snapshot
        self.isReadOnly = readOnly
        self.image = RawImage(raw: handle!, spec: spec, snapshot: snapshot)
        self.logger = logger
    }

    /// A handle dropped without `close()` is a caller's bug; it is closed all the same, but on another thread:
    /// the last reference may go inside a librbd callback, where `rbd_close` would deadlock.
    deinit {
        guard !isClosed else { return }
        logger.warning("image handle dropped without close", metadata: ["image": "\(target)"])
        let (image, watches, logger) = (image, watches, logger)
        DispatchQueue.global().async {
            Self.release(image, watches: watches, logger: logger)
        }
    }

    private var raw: rbd_image_t { image.raw }
    private var target: String { image.target }

    // MARK: Metadata

    public func info() throws -> ImageInfo {
        try image.info()
    }

    public func size() throws -> UInt64 {
        var size: UInt64 = 0
        try check(rbd_get_size(raw, &size), "rbd_get_size", target)
        return size
    }

    public func snapshots() throws -> [SnapshotInfo] {
        try image.userSnapshots()
    }

    /// The clones of the snapshot this handle is open at.
    public func children() throws -> [ImageSpec] {
        try image.children()
    }

    // MARK: Asynchronous I/O

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     completion: @escaping @Sendable (Result<Int, StorageError>) -> Void) {
        start("rbd_aio_read", completion: completion) {
            rbd_aio_read(self.raw, offset, buffer.count, buffer.baseAddress?.assumingMemoryBound(to: CChar.self), $0)
        }
    }

    /// The data is copied before this returns: `CephStore.connect` pins `rbd_disable_zero_copy_writes`.
    public func write(at offset: UInt64, from data: UnsafeRawBufferPointer,
                      completion: @escaping @Sendable (Result<Void, StorageError>) -> Void) {
        start("rbd_aio_write", completion: { completion($0.map { _ in }) }) {
            rbd_aio_write(self.raw, offset, data.count, data.baseAddress?.assumingMemoryBound(to: CChar.self), $0)
        }
    }

    public func discard(at offset: UInt64, length: UInt64,
                        completion: @escaping @Sendable (Result<Void, StorageError>) -> Void) {
        start("rbd_aio_discard", completion: { completion($0.map { _ in }) }) {
            rbd_aio_discard(self.raw, offset, length, $0)
        }
    }

    /// Thin: whole objects in the range are released, partial ones zeroed.
    public func writeZeroes(at offset: UInt64, length: UInt64,
                            completion: @escaping @Sendable (Result<Void, StorageError>) -> Void) {
        start("rbd_aio_write_zeroes", completion: { completion($0.map { _ in }) }) {
            rbd_aio_write_zeroes(self.raw, offset, Int(length), $0, 0 /* zero_flags: thin */, 0 /* op_flags */)
        }
    }

    public func flush(completion: @escaping @Sendable (Result<Void, StorageError>) -> Void) {
        start("rbd_aio_flush", completion: { completion($0.map { _ in }) }) {
            rbd_aio_flush(self.raw, $0)
        }
    }

    private func start(_ operation: String, completion: @escaping (Result<Int, StorageError>) -> Void,
                       _ submit: (rbd_completion_t) -> Int32) {
        let target = self.target
        startAsync(submit) { code in
            completion(code < 0
                ? .failure(StorageError(code: code, operation: operation, target: target))
                : .success(code))
        }
    }

    // MARK: Size and allocation

    /// Shrinking is allowed: the data past the new end is discarded.
    public func resize(to size: UInt64) throws {
        try check(rbd_resize2(raw, size, true /* allow_shrink */, ignoreProgress, nil), "rbd_resize2", target)
    }

    /// Whole objects that hold data in `range` (clipped to it and to the image), including data that shows
    /// through from a parent, merged where they touch. Uses the object map when fast-diff is valid.
    public func allocatedExtents(in range: Range<UInt64>) throws -> [Range<UInt64>] {
        let end = min(range.upperBound, try size())
        guard range.lowerBound < end else { return [] }
        let clipped = range.lowerBound..<end
        var merged: [Range<UInt64>] = []
        let extents = try dataExtents(in: clipped, includingParent: true)
        for extent in extents.map({ $0.clamped(to: clipped) }).sorted(by: { $0.lowerBound < $1.lowerBound }) {
            if let last = merged.last, last.upperBound >= extent.lowerBound {
                merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, extent.upperBound)
            } else {
                merged.append(extent)
            }
        }
        return merged
    }

    /// The bytes of the objects this image (or snapshot) holds itself, not counting a parent's: what
    /// `rbd du` reports for an image without snapshots, and what stays allocated if every snapshot goes.
    public func usedBytes() throws -> UInt64 {
        try image.usedBytes(size: size())
    }

    // MARK: Exclusive lock

    public func ownsExclusiveLock() throws -> Bool? {
        var features: UInt64 = 0
        try check(rbd_get_features(raw, &features), "rbd_get_features", target)
        guard features & UInt64(RBD_FEATURE_EXCLUSIVE_LOCK) != 0 else { return nil }
        var owner: Int32 = 0
        try check(rbd_is_exclusive_lock_owner(raw, &owner), "rbd_is_exclusive_lock_owner", target)
        return owner != 0
    }

    public func isLockedByAnotherClient() throws -> Bool {
        if try ownsExclusiveLock() == true { return false }
        var mode = RBD_LOCK_MODE_EXCLUSIVE
        return try withFilledArray(of: UnsafeMutablePointer<CChar>?.self, count: 4, { owners, count in
            rbd_lock_get_owners(raw, &mode, owners, &count)
        }) { code, owners, count in
            if code == -ENOENT { return false }  // nobody holds it
            try check(code, "rbd_lock_get_owners", target)
            rbd_lock_get_owners_cleanup(owners, count)
            return count > 0
        }
    }

    private func dataExtents(in range: Range<UInt64>, includingParent: Bool) throws -> [Range<UInt64>] {
        try image.dataExtents(in: range, includingParent: includingParent)
    }

    // MARK: Snapshots

    public func createSnapshot(_ name: String) throws {
        try check(rbd_snap_create(raw, name), "rbd_snap_create", spec.describing(snapshot: name))
    }

    /// EBUSY while the snapshot is protected.
    public func removeSnapshot(_ name: String) throws {
        try check(rbd_snap_remove(raw, name), "rbd_snap_remove", spec.describing(snapshot: name))
    }

    public func renameSnapshot(_ name: String, to newName: String) throws {
        try check(rbd_snap_rename(raw, name, newName), "rbd_snap_rename", spec.describing(snapshot: name))
    }

    /// EBUSY if it is protected already.
    public func protectSnapshot(_ name: String) throws {
        try check(rbd_snap_protect(raw, name), "rbd_snap_protect", spec.describing(snapshot: name))
    }

    /// EBUSY while clones depend on the snapshot; EINVAL if it is not protected.
    public func unprotectSnapshot(_ name: String) throws {
        try check(rbd_snap_unprotect(raw, name), "rbd_snap_unprotect", spec.describing(snapshot: name))
    }

    /// `progress` may run on librbd's threads. The corresponding C function is `rbd_flatten_with_progress`.
    public func flatten(progress: (@Sendable (UInt64, UInt64) -> Void)?) throws {
        let reporter = ProgressReporter(progress ?? { _, _ in })
        let code = withExtendedLifetime(reporter) {
            rbd_flatten_with_progress(raw, ProgressReporter.callback, Unmanaged.passUnretained(reporter).toOpaque())
        }
        try check(code, "rbd_flatten_with_progress", target)
    }

    // MARK: Watches and closing

    /// Only a read-write handle hears other clients (a read-only one has no header watch).
    /// The corresponding C function is `rbd_update_watch`.
    public func watchUpdates(_ handler: @escaping @Sendable () -> Void) throws {
        let context = Unmanaged.passRetained(UpdateHandler(handler))
        var handle: UInt64 = 0
        let code = rbd_update_watch(raw, &handle, UpdateHandler.callback, context.toOpaque())
        guard code >= 0 else {
            context.release()
            throw StorageError(code: code, operation: "rbd_update_watch", target: target)
        }
        lock.withLock { watches[handle] = context }
    }

    /// Unwatches and closes; a second call does nothing. Must not run inside an I/O completion or an update
    /// handler. The corresponding C function is `rbd_close`, which also flushes pending writes.
    public func close() {
        let watches: [UInt64: Unmanaged<UpdateHandler>]? = lock.withLock {
            guard !isClosed else { return nil }
            isClosed = true
            defer { self.watches = [:] }
            return self.watches
        }
        guard let watches else { return }
        Self.release(image, watches: watches, logger: logger)
    }

    private static func release(_ image: RawImage, watches: [UInt64: Unmanaged<UpdateHandler>], logger: Logger) {
        for (handle, context) in watches {
            rbd_update_unwatch(image.raw, handle)
            context.release()
        }
        // Nobody is left to return an error to; flush() is where write errors are reported.
        let code = rbd_close(image.raw)
        if code < 0 {
            logger.error("\(StorageError(code: code, operation: "rbd_close", target: image.target))")
        }
    }
}

/// Carries a Swift progress closure through librbd's `librbd_progress_fn_t`.
private final class ProgressReporter {
    let report: (UInt64, UInt64) -> Void

    init(_ report: @escaping (UInt64, UInt64) -> Void) {
        self.report = report
    }

    static let callback: librbd_progress_fn_t = { done, total, context in
        Unmanaged<ProgressReporter>.fromOpaque(context!).takeUnretainedValue().report(done, total)
        return 0
    }
}

/// Carries a Swift handler through librbd's `rbd_update_callback_t`.
private final class UpdateHandler {
    let handler: @Sendable () -> Void

    init(_ handler: @escaping @Sendable () -> Void) {
        self.handler = handler
    }

    static let callback: rbd_update_callback_t = { context in
        Unmanaged<UpdateHandler>.fromOpaque(context!).takeUnretainedValue().handler()
    }
}
