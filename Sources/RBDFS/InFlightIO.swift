import Foundation

/// The I/O of one open image that librbd has not finished yet, kept in the order it was asked for.
///
/// Buffered writes are acknowledged as soon as librbd holds a copy of the data, before the OSDs have it,
/// as a local filesystem's page cache would; `cp` and `dd` then keep many writes in flight instead of one
/// (see docs/PERFORMANCE.md, "write-behind"). What keeps that safe lives here:
/// - an operation never starts while an earlier one it overlaps is still out, if either of them writes:
///   a read sees every write acknowledged before it, and overlapping writes land in the order given;
/// - at most `byteBudget` bytes and `writeBudget` writes are out at once; later writes wait for room,
///   and so do their replies;
/// - a barrier (flush, resize, SEEK_DATA, close) starts only once everything before it has completed, and
///   nothing after it starts before it is done;
/// - failures of writes already acknowledged are counted and kept, for the next flush of each open file.
///
/// librbd's own write-around cache does the first three, but a write failure it has acknowledged reaches
/// only a flush that finds other writes in flight; a later flush answers success. rbdfs therefore turns
/// librbd's cache off and keeps the failures itself.
final class InFlightIO: @unchecked Sendable {
    enum Kind { case read, write, barrier }

    /// Called when the operation finishes (from any thread, exactly once).
    typealias Done = @Sendable () -> Void

    private struct Waiting {
        let id: UInt64
        let range: Range<UInt64>
        let kind: Kind
        let bytes: Int
        let start: @Sendable (@escaping Done) -> Void
    }

    private struct Running {
        let range: Range<UInt64>
        let kind: Kind
        let bytes: Int
    }

    let byteBudget: Int
    let writeBudget: Int

    private let lock = NSLock()
    private var nextID: UInt64 = 1
    /// Guarded by `lock`.
    private var running: [UInt64: Running] = [:]
    private var waiting: [Waiting] = []
    private var runningWrites = 0
    private var runningWriteBytes = 0
    private var runningBarrier = false
    private var failureCount: UInt64 = 0
    private var lastFailure: FSError?

    init(byteBudget: Int = 64 << 20, writeBudget: Int = 64) {
        precondition(byteBudget > 0 && writeBudget > 0)
        self.byteBudget = byteBudget
        self.writeBudget = writeBudget
    }

    /// Runs `start` now, or later in order once nothing before it stands in its way. `start` must call the
    /// `Done` it is given when the operation has finished. Never calls `start` with the lock held.
    func submit(_ range: Range<UInt64>, kind: Kind, bytes: Int = 0,
                start: @escaping @Sendable (@escaping Done) -> Void) {
        submit(range, kind: kind, bytes: bytes, now: start, later: { start })
    }

    /// `submit` with two ways to start: `now` (not escaping) runs before this returns if the operation may
    /// start at once; otherwise `later` is asked, with the lock held, for what to run when it may.
    func submit(_ range: Range<UInt64>, kind: Kind, bytes: Int = 0,
                now: (@escaping Done) -> Void, later: () -> @Sendable (@escaping Done) -> Void) {
        let id: UInt64? = lock.withLock {
            let id = nextID
            nextID += 1
            let placeholder: @Sendable (@escaping Done) -> Void = { _ in }
            let operation = Waiting(id: id, range: range, kind: kind, bytes: bytes, start: placeholder)
            if mayStart(operation, waitingBefore: waiting.count) {
                begin(operation)
                return id
            }
            waiting.append(Waiting(id: id, range: range, kind: kind, bytes: bytes, start: later()))
            return nil
        }
        guard let id else { return }
        now { self.finish(id) }
    }

    /// `submit` for an operation whose arguments live only as long as this call (a FUSE request's write
    /// buffer): runs `start` on this thread once the operation may start, blocking until then. A FUSE worker
    /// waiting for room is the back-pressure, and the buffer stays valid without a copy. Never call it from
    /// a completion.
    func submitBlocking(_ range: Range<UInt64>, kind: Kind, bytes: Int = 0, start: (@escaping Done) -> Void) {
        let gate = DispatchSemaphore(value: 0)
        let handed = LockedBox<Done?>(nil)
        var startedNow = false
        submit(range, kind: kind, bytes: bytes, now: { done in
            startedNow = true
            start(done)
        }, later: {
            { done in
                handed.value = done
                gate.signal()
            }
        })
        guard !startedNow else { return }
        gate.wait()
        start(handed.value!)
    }

    /// Runs `body` once everything submitted before has finished; nothing submitted later starts before
    /// `body` calls its `Done`.
    func barrier(_ body: @escaping @Sendable (@escaping Done) -> Void) {
        submit(0..<UInt64.max, kind: .barrier, start: body)
    }

    /// Blocks until everything submitted before has finished. For worker threads only (never from a
    /// completion): flush, resize, SEEK_DATA and close call it before they act.
    func waitForEarlier() {
        if isIdle { return }
        let passed = DispatchSemaphore(value: 0)
        barrier { done in
            done()
            passed.signal()
        }
        passed.wait()
    }

    /// True while nothing is in flight or waiting.
    var isIdle: Bool { lock.withLock { running.isEmpty && waiting.isEmpty } }

    // MARK: Failures of acknowledged writes

    /// Records the failure of a write that was already acknowledged.
    func recordFailure(_ error: FSError) {
        lock.withLock {
            failureCount += 1
            lastFailure = error
        }
    }

    /// How many acknowledged writes have failed so far, and the last failure.
    var failures: (count: UInt64, last: FSError?) { lock.withLock { (failureCount, lastFailure) } }

    // MARK: Scheduling (with `lock` held)

    private func overlaps(_ a: Range<UInt64>, _ b: Range<UInt64>) -> Bool {
        a.lowerBound < b.upperBound && b.lowerBound < a.upperBound
    }

    /// Whether `operation` may start, given what runs and the first `waitingBefore` waiting operations.
    private func mayStart(_ operation: Waiting, waitingBefore: Int) -> Bool {
        if runningBarrier { return false }
        if operation.kind == .barrier { return running.isEmpty && waitingBefore == 0 }
        if operation.kind == .write && runningWrites > 0
            && (runningWrites >= writeBudget || runningWriteBytes + operation.bytes > byteBudget) {
            return false
        }
        // Reads may pass each other and go around waiting writes they do not touch; writes keep their order.
        for earlier in waiting.prefix(waitingBefore) {
            if earlier.kind == .barrier { return false }
            if operation.kind == .write && earlier.kind == .write { return false }
            if (operation.kind == .write || earlier.kind == .write) && overlaps(operation.range, earlier.range) {
                return false
            }
        }
        if operation.kind == .read && runningWrites == 0 { return true }
        for other in running.values where operation.kind == .write || other.kind == .write {
            if overlaps(operation.range, other.range) { return false }
        }
        return true
    }

    private func begin(_ operation: Waiting) {
        running[operation.id] = Running(range: operation.range, kind: operation.kind, bytes: operation.bytes)
        switch operation.kind {
        case .write:
            runningWrites += 1
            runningWriteBytes += operation.bytes
        case .barrier:
            runningBarrier = true
        case .read:
            break
        }
    }

    private func finish(_ id: UInt64) {
        let ready: [Waiting] = lock.withLock {
            guard let done = running.removeValue(forKey: id) else { return [] }
            switch done.kind {
            case .write:
                runningWrites -= 1
                runningWriteBytes -= done.bytes
            case .barrier:
                runningBarrier = false
            case .read:
                break
            }
            var ready: [Waiting] = []
            var index = 0
            while index < waiting.count {
                if mayStart(waiting[index], waitingBefore: index) {
                    let operation = waiting.remove(at: index)
                    begin(operation)
                    ready.append(operation)
                    if operation.kind == .barrier { break }
                } else {
                    index += 1
                }
            }
            return ready
        }
        for operation in ready {
            let id = operation.id
            operation.start { self.finish(id) }
        }
    }
}
