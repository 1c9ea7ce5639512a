import Foundation
import Logging
import Storage

// The I/O engine: every read and write of file data goes through here.
//
// A request is split at object boundaries and each piece is issued asynchronously, so one 1 MiB FUSE
// request that spans two objects keeps two OSDs busy. The reply is sent from the completion of the last
// piece: no FUSE worker thread ever blocks on librbd for data. Errors are never turned into short reads
// or short writes: the first failed piece fails the whole request with its errno.
//
// Growth: librbd never grows an image on write, so a write past the end resizes first, in large steps
// (as Glance's resize-on-write does), and the image is trimmed back to the bytes really written when the
// writer flushes or closes.

/// Splitting byte ranges at object boundaries.
public enum ObjectExtents {
    /// The pieces of `[offset, offset+length)` that each lie inside one object.
    public static func split(offset: UInt64, length: UInt64, objectSize: UInt64) -> [Range<UInt64>] {
        precondition(objectSize > 0)
        var pieces: [Range<UInt64>] = []
        var start = offset
        let end = offset + length
        while start < end {
            let objectEnd = (start / objectSize + 1) * objectSize
            let pieceEnd = min(objectEnd, end)
            pieces.append(start..<pieceEnd)
            start = pieceEnd
        }
        return pieces
    }

    /// The size to grow an image to when a write needs `needed` bytes and it has `current`: at least
    /// `needed`, and a step of the current size (between 64 MiB and 1 GiB) further, rounded to whole objects,
    /// so a streaming copy resizes a few dozen times, not once per request.
    public static func grownSize(current: UInt64, needed: UInt64, objectSize: UInt64) -> UInt64 {
        let step = min(max(current, 64 << 20), 1 << 30)
        let target = max(needed, current + step)
        return (target + objectSize - 1) / objectSize * objectSize
    }
}

/// One open image or snapshot, shared by every open file of it.
final class OpenImage: @unchecked Sendable {
    let key: NodeKey
    let spec: ImageSpec
    let handle: any ImageHandle
    let objectSize: UInt64
    /// What is in flight on this image, in order (write-behind, see InFlightIO).
    let io = InFlightIO()
    /// librbd's id of the image this handle has open ("" if unknown): how a name taken over by another image
    /// is told apart.
    let imageID: String
    /// librbd's id of the snapshot this handle reads (nil for a head).
    let snapshotID: UInt64?

    private let lock = NSLock()
    /// Open files using this image (the cache closes the handle at zero).
    var openCount = 0
    /// The size the files show while the image is over-allocated by a growth step; nil when the image's
    /// own size is the truth.
    private var writtenSize: UInt64?

    /// Glance-style upload: the snapshot to take of this (head) image when its last writer closes.
    private var uploadSnapshot: String?
    /// Set once the upload's snapshot is taken: the file is the snapshot now, and takes no more writes.
    private var sealed = false
    /// The first write that failed, so the upload's close fails too and no snapshot is made.
    private var firstWriteError: FSError?
    /// Objects holding data, known only for images this mount created (empty at creation, then written only
    /// through this handle while it is open): what lets all-zero writes into never-written objects be skipped.
    private var writtenObjects: Set<UInt64>?
    /// Data extents for SEEK_DATA / SEEK_HOLE, dropped by every change made through this handle.
    private var cachedExtents: [Range<UInt64>]?
    /// Whether this handle has been seen holding the image's exclusive lock (guarded by `lock`).
    private var heldExclusiveLock = false
    /// Set when another client removed, renamed or replaced the image under its name: the files open on it
    /// answer ESTALE from then on.
    private var replaced = false

    init(key: NodeKey, spec: ImageSpec, handle: any ImageHandle, objectSize: UInt64, imageID: String = "",
         snapshotID: UInt64? = nil, uploadSnapshot: String? = nil) {
        self.key = key
        self.spec = spec
        self.handle = handle
        self.objectSize = objectSize
        self.imageID = imageID
        self.snapshotID = snapshotID
        self.uploadSnapshot = uploadSnapshot
    }

    var isReplaced: Bool { lock.withLock { replaced } }
    func markReplaced() { lock.withLock { replaced = true } }

    /// True when `summary` (of the image now at this handle's name; nil: no image has it) is this handle's
    /// image, and still has the snapshot it reads. Snapshots are matched by id, so a renamed one still matches.
    func isStill(_ summary: ImageSummary?) -> Bool {
        guard let summary else { return false }
        guard imageID.isEmpty || summary.info.id == imageID else { return false }
        guard let snapshotID else { return true }
        return summary.snapshots.contains { $0.id == snapshotID }
    }

    /// True while this is an upload whose snapshot is not taken yet.
    var isUploading: Bool { lock.withLock { uploadSnapshot != nil && !sealed } }
    var isSealed: Bool { lock.withLock { sealed } }

    func recordWriteFailure(_ error: FSError) {
        lock.withLock { if firstWriteError == nil { firstWriteError = error } }
    }

    /// The upload's snapshot name when it is due (not sealed yet), or the write error that cancels it.
    func pendingUpload() -> (snapshot: String, failure: FSError?)? {
        lock.withLock {
            guard let uploadSnapshot, !sealed else { return nil }
            return (uploadSnapshot, firstWriteError)
        }
    }

    func seal() { lock.withLock { sealed = true } }

    // MARK: Allocation

    /// Starts tracking written objects: call right after creating the image, before any write.
    func trackAllocationFromEmpty() { lock.withLock { writtenObjects = [] } }

    /// True when this handle never wrote the object (so, if no other client did, it holds no data).
    func objectIsUnwritten(_ index: UInt64) -> Bool {
        lock.withLock { writtenObjects.map { !$0.contains(index) } ?? false }
    }

    /// Which of `candidates` (all-zero pieces of a write, each into an object this handle never wrote) may
    /// go unsent. Zero-skipping trusts that only this handle writes the image, which librbd's exclusive lock
    /// tells: while this handle holds it, no one else writes; if it held it and lost it, someone else took
    /// it to write, and skipping stops for good (`MultiWriterTests.zerosWrittenAfterAnotherMountsDataReplaceIt`).
    /// Before this handle first holds it, a piece is skipped only if no other client holds the lock now and
    /// its object holds no data (both asked of the cluster); with no exclusive-lock feature, never.
    func zerosToSkip(among candidates: [Range<UInt64>]) -> [Range<UInt64>] {
        guard !candidates.isEmpty, lock.withLock({ writtenObjects != nil }) else { return [] }
        let owns = try? handle.ownsExclusiveLock()
        let neverHeld = lock.withLock { () -> Bool in
            if owns == true { heldExclusiveLock = true }
            return !heldExclusiveLock
        }
        if owns == true { return candidates }
        if owns == false && neverHeld, (try? handle.isLockedByAnotherClient()) == false {
            let span = candidates.first!.lowerBound..<candidates.last!.upperBound
            // Not known: send these, and go on trusting the objects this handle wrote.
            guard let allocated = try? handle.allocatedExtents(in: span) else { return [] }
            // Another client's data in an object this handle never wrote means it writes the image too.
            if !candidates.contains(where: { piece in allocated.contains { $0.overlaps(piece) } }) {
                return candidates
            }
        }
        lock.withLock { writtenObjects = nil }  // another client may have written: every write is sent from now on
        return []
    }

    /// Records a write about to be issued.
    func noteWrite(_ range: Range<UInt64>) {
        lock.withLock {
            cachedExtents = nil
            guard writtenObjects != nil, !range.isEmpty else { return }
            for index in (range.lowerBound / objectSize)...((range.upperBound - 1) / objectSize) {
                writtenObjects!.insert(index)
            }
        }
    }

    /// Records a range made to read as zeros (whole objects in it no longer hold data).
    func noteZeroed(_ range: Range<UInt64>) {
        lock.withLock {
            cachedExtents = nil
            guard writtenObjects != nil else { return }
            let first = (range.lowerBound + objectSize - 1) / objectSize
            let end = range.upperBound / objectSize
            if first < end { for index in first..<end { writtenObjects!.remove(index) } }
        }
    }

    /// Data extents (object-aligned, merged, including a parent's data), cached until the next change.
    func dataExtents() throws(FSError) -> [Range<UInt64>] {
        io.waitForEarlier()  // writes still in flight are data already
        if let cached = lock.withLock({ cachedExtents }) { return cached }
        let size = try currentSize()
        let extents = try FSError.wrap { try handle.allocatedExtents(in: 0..<size) }
        lock.withLock { cachedExtents = extents }
        return extents
    }

    var path: String { key.description }

    /// The size files see: what was written while a growth step is pending, else the image's size.
    func currentSize() throws(FSError) -> UInt64 {
        lock.lock()
        defer { lock.unlock() }
        if let writtenSize { return writtenSize }
        return try FSError.wrap { try handle.size() }
    }

    /// Makes room for a write ending at `end`, growing the image in steps when it passes the end.
    func prepareWrite(ending end: UInt64) throws(FSError) {
        lock.lock()
        defer { lock.unlock() }
        let allocated = try FSError.wrap { try handle.size() }
        guard end > (writtenSize ?? allocated) else { return }
        if end > allocated {
            let target = ObjectExtents.grownSize(current: allocated, needed: end, objectSize: objectSize)
            try FSError.wrap { try handle.resize(to: target) }
            writtenSize = target == end ? nil : end
        } else {
            writtenSize = end == allocated ? nil : end
        }
    }

    /// Sets the size files see (truncate); drops any pending growth step.
    func resize(to size: UInt64) throws(FSError) {
        io.waitForEarlier()  // a shrink must not race a write still in flight past the new end
        lock.lock()
        defer { lock.unlock() }
        try FSError.wrap { try handle.resize(to: size) }
        writtenSize = nil
        cachedExtents = nil
        if writtenObjects != nil {
            let kept = (size + objectSize - 1) / objectSize
            writtenObjects = writtenObjects!.filter { $0 < kept }
        }
    }

    /// Gives back the unwritten tail of a growth step, so the image ends at the last byte written.
    ///
    /// Not if another client has taken the exclusive lock since this handle grew the image (growing took
    /// it): that client may have written inside the step, and the trim would cut its data off. The image
    /// then keeps the step's size. (`MultiWriterTests.anotherMountsWriteInsideTheGrowthStepSurvivesTheTrim`)
    /// Returns false when it kept the step for that reason.
    @discardableResult
    func trimGrowth() throws(FSError) -> Bool {
        io.waitForEarlier()
        lock.lock()
        defer { lock.unlock() }
        guard let size = writtenSize else { return true }
        writtenSize = nil
        if (try? handle.ownsExclusiveLock()) == false { return false }
        try FSError.wrap { try handle.resize(to: size) }
        return true
    }
}

/// Counts the pieces of one request down and replies once, with the first error if any.
private final class PieceGather: @unchecked Sendable {
    private let lock = NSLock()
    private var remaining: Int
    private var firstError: StorageError?

    init(pieces: Int) { remaining = pieces }

    /// Records one piece's outcome; returns the request's outcome when it was the last piece.
    func finish(_ error: StorageError?) -> StorageError?? {
        lock.lock()
        defer { lock.unlock() }
        if let error, firstError == nil { firstError = error }
        remaining -= 1
        return remaining == 0 ? .some(firstError) : .none
    }
}

public enum IOEngine {
    /// Reads `[offset, offset+size)` clamped to the image's size; `reply` gets a buffer that is valid only
    /// during the call. At or past the end, the reply is empty (librbd itself would return EINVAL).
    static func read(
        _ image: OpenImage, offset: UInt64, size: Int,
        reply: @escaping @Sendable (Result<UnsafeRawBufferPointer, FSError>) -> Void
    ) {
        let imageSize: UInt64
        do {
            imageSize = try image.currentSize()
        } catch {
            return reply(.failure(error))
        }
        guard offset < imageSize, size > 0 else {
            return reply(.success(UnsafeRawBufferPointer(start: nil, count: 0)))
        }
        let length = min(UInt64(size), imageSize - offset)
        let pieces = ObjectExtents.split(offset: offset, length: length, objectSize: image.objectSize)
        image.io.submit(offset..<offset + length, kind: .read) { done in
            let request = ReadRequest(length: Int(length), pieces: pieces.count, done: done, reply: reply)
            for piece in pieces {
                let start = Int(piece.lowerBound - offset)
                image.handle.read(at: piece.lowerBound, into: request.slice(start..<start + piece.count)) { result in
                    request.finish(pieceAt: start, length: piece.count, result)
                }
            }
        }
    }

    /// Writes `data` at `offset`, growing the image first when the write passes its end. `data` is copied
    /// before this returns. `reply` gets the byte count, always all of it on success.
    ///
    /// `acknowledgeEarly` (all but O_SYNC / O_DSYNC writes): the reply goes as soon as librbd has the data,
    /// and a failure found later goes to `lateFailure` (and from there to the next flush); otherwise the
    /// reply waits for the OSDs.
    static func write(
        _ image: OpenImage, offset: UInt64, data: UnsafeRawBufferPointer, acknowledgeEarly: Bool = false,
        lateFailure: @escaping @Sendable (FSError) -> Void = { _ in },
        reply: @escaping @Sendable (Result<Int, FSError>) -> Void
    ) {
        guard data.count > 0 else { return reply(.success(0)) }
        do {
            try image.prepareWrite(ending: offset + UInt64(data.count))
        } catch {
            return reply(.failure(error))
        }
        let pieces = ObjectExtents.split(offset: offset, length: UInt64(data.count), objectSize: image.objectSize)
        // Thin import: zeros written into an object that holds nothing change nothing, so they are not sent.
        let skipped = image.zerosToSkip(among: pieces.filter { piece in
            let start = Int(piece.lowerBound - offset)
            let slice = UnsafeRawBufferPointer(rebasing: data[start..<start + piece.count])
            return image.objectIsUnwritten(piece.lowerBound / image.objectSize) && ZeroScan.isAllZero(slice)
        })
        let sent = pieces.filter { !skipped.contains($0) }
        let total = data.count
        guard !sent.isEmpty else { return reply(.success(total)) }
        // Noted now, in request order: a later write of zeros must not be skipped over data still queued.
        for piece in sent { image.noteWrite(piece) }

        let range = sent.first!.lowerBound..<sent.last!.upperBound
        let bytes = sent.reduce(0) { $0 + $1.count }
        // Waits (on this FUSE worker) while earlier I/O stands in its way: the request's buffer is only valid
        // until this returns, and a full budget is meant to slow the writer down.
        image.io.submitBlocking(range, kind: .write, bytes: bytes) { done in
            let gather = PieceGather(pieces: sent.count)
            for piece in sent {
                let start = Int(piece.lowerBound - offset)
                let slice = UnsafeRawBufferPointer(rebasing: data[start..<start + piece.count])
                image.handle.write(at: piece.lowerBound, from: slice) { result in
                    var failure: StorageError?
                    if case .failure(let error) = result { failure = error }
                    guard let outcome = gather.finish(failure) else { return }
                    if acknowledgeEarly {
                        // Recorded before `done`, so a flush waiting for this write sees the failure.
                        if let outcome { lateFailure(.storage(outcome)) }
                        done()
                    } else {
                        done()
                        reply(outcome.map { .failure(.storage($0)) } ?? .success(total))
                    }
                }
            }
            // librbd copied the data: the page-cache promise holds from here.
            if acknowledgeEarly { reply(.success(total)) }
        }
    }

    /// Makes `[offset, offset+length)` read as zeros, releasing the whole objects in it (punch hole,
    /// zero range). The range must lie inside the image.
    static func zero(_ image: OpenImage, offset: UInt64, length: UInt64,
                     reply: @escaping @Sendable (Result<Void, FSError>) -> Void) {
        guard length > 0 else { return reply(.success(())) }
        image.noteZeroed(offset..<offset + length)
        image.io.submit(offset..<offset + length, kind: .write) { done in
            image.handle.writeZeroes(at: offset, length: length) { result in
                done()
                reply(result.mapError { .storage($0) })
            }
        }
    }

    /// Trims a pending growth step and makes every acknowledged write durable: waits for the writes still
    /// in flight (on the calling worker thread), then flushes librbd. Failures of writes acknowledged
    /// early are the caller's to check (`InFlightIO.failures`).
    static func flush(_ image: OpenImage, reply: @escaping @Sendable (Result<Void, FSError>) -> Void) {
        do {
            try image.trimGrowth()
        } catch {
            return reply(.failure(error))
        }
        image.handle.flush { result in
            reply(result.mapError { .storage($0) })
        }
    }
}

enum ZeroScan {
    /// True when every byte is zero; reads eight bytes at a time.
    static func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        let words = bytes.count / 8
        for index in 0..<words where base.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self) != 0 {
            return false
        }
        for index in (words * 8)..<bytes.count where bytes[index] != 0 { return false }
        return true
    }
}

/// One read in flight: its buffer, the pieces still out, and the reply to send when the last one is back.
private final class ReadRequest: @unchecked Sendable {
    private let buffer: UnsafeMutableRawBufferPointer
    private let reply: @Sendable (Result<UnsafeRawBufferPointer, FSError>) -> Void
    private let done: InFlightIO.Done
    private let gather: PieceGather
    private let lock = NSLock()
    /// The lowest offset at which a piece came back short (the image shrank meanwhile): answer up to there.
    private var validLength: Int

    init(length: Int, pieces: Int, done: @escaping InFlightIO.Done,
         reply: @escaping @Sendable (Result<UnsafeRawBufferPointer, FSError>) -> Void) {
        self.done = done
        buffer = ReadBuffers.shared.take(length)
        gather = PieceGather(pieces: pieces)
        validLength = length
        self.reply = reply
    }

    deinit { ReadBuffers.shared.give(buffer) }

    func slice(_ range: Range<Int>) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: buffer[range])
    }

    func finish(pieceAt start: Int, length: Int, _ result: Result<Int, StorageError>) {
        var failure: StorageError?
        switch result {
        case .success(let count) where count < length:
            lock.withLock { validLength = min(validLength, start + count) }
        case .success:
            break
        case .failure(let error):
            failure = error
        }
        guard let outcome = gather.finish(failure) else { return }
        done()
        if let error = outcome {
            reply(.failure(.storage(error)))
        } else {
            reply(.success(UnsafeRawBufferPointer(rebasing: buffer[0..<lock.withLock { validLength }])))
        }
    }
}

/// Read buffers kept for reuse. A fresh 1 MiB buffer comes from mmap, and its first touch (librbd copying
/// the data in, on librbd's completion thread) faults and zeroes every page: at streaming rates that cost
/// more than the copy itself.
final class ReadBuffers: @unchecked Sendable {
    static let shared = ReadBuffers()

    /// The size every kept buffer has: the largest FUSE request (max_write / max_pages, 1 MiB).
    let bufferSize = 1 << 20
    /// At most this many idle buffers are kept (64 MiB).
    let keptLimit = 64
    private let lock = NSLock()
    private var idle: [UnsafeMutableRawPointer] = []

    /// A buffer of exactly `count` bytes (a view of a kept buffer when it fits one).
    func take(_ count: Int) -> UnsafeMutableRawBufferPointer {
        guard count <= bufferSize else { return .allocate(byteCount: count, alignment: 4096) }
        let base = lock.withLock { idle.popLast() }
            ?? UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 4096)
        return UnsafeMutableRawBufferPointer(start: base, count: count)
    }

    /// Frees every idle buffer (nothing is being read).
    func releaseIdle() {
        let freed = lock.withLock { () -> [UnsafeMutableRawPointer] in
            defer { idle = [] }
            return idle
        }
        for base in freed { base.deallocate() }
    }

    func give(_ buffer: UnsafeMutableRawBufferPointer) {
        guard let base = buffer.baseAddress else { return }
        guard buffer.count <= bufferSize else { return base.deallocate() }
        let kept = lock.withLock { () -> Bool in
            guard idle.count < keptLimit else { return false }
            idle.append(base)
            return true
        }
        if !kept { base.deallocate() }
    }
}
