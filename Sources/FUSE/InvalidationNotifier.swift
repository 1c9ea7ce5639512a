import CFuse
import Foundation
import Logging
import RBDFS

/// Tells the kernel what to forget (`fuse_lowlevel_notify_inval_inode` / `_inval_entry`) from one thread of
/// its own.
///
/// The notify calls write to /dev/fuse and the kernel acts on them at once: an entry invalidation takes the
/// directory's lock and a page invalidation waits for the pages' locks, which a request in flight may hold
/// until a FUSE worker answers it. Called from a worker, or from a librbd callback a worker's reply waits
/// for, they can deadlock; so callers only queue (never blocking), and this thread, which holds no lock and
/// answers no request, makes the calls. Requests already queued are not queued twice.
///
/// `stop()` ends the thread before the session goes away: nothing is sent after it returns.
final class InvalidationNotifier: KernelInvalidator, @unchecked Sendable {
    private enum Notice: Hashable {
        case inode(UInt64, data: Bool)
        case entry(parent: UInt64, name: String)
    }

    /// More than this many waiting notices are dropped (the attribute and entry timeouts still apply).
    static let capacity = 65_536

    private let session: OpaquePointer
    private let logger: Logger
    private let condition = NSCondition()
    /// Guarded by `condition`.
    private var pending: [Notice] = []
    private var queued: Set<Notice> = []
    private var stopping = false
    private var started = false
    private let finished = DispatchSemaphore(value: 0)

    init(session: OpaquePointer, logger: Logger) {
        self.session = session
        self.logger = logger
    }

    func start() {
        condition.withLock { started = true }
        let thread = Thread { [self] in
            run()
            finished.signal()
        }
        thread.name = "rbdfs-invalidate"
        thread.start()
    }

    func invalidateInode(_ inode: UInt64, data: Bool) {
        enqueue(.inode(inode, data: data))
    }

    func invalidateEntry(parent: UInt64, name: String) {
        enqueue(.entry(parent: parent, name: name))
    }

    private func enqueue(_ notice: Notice) {
        condition.lock()
        defer { condition.unlock() }
        guard !stopping, pending.count < Self.capacity, queued.insert(notice).inserted else { return }
        pending.append(notice)
        condition.signal()
    }

    /// Ends the thread: no notice is sent once this returns true. False when a notice in progress did not
    /// return within `timeout` seconds (the kernel is stuck): the session must then not be destroyed.
    func stop(timeout: Double) -> Bool {
        let wasStarted = condition.withLock { () -> Bool in
            stopping = true
            pending.removeAll()
            queued.removeAll()
            condition.signal()
            return started
        }
        guard wasStarted else { return true }
        guard finished.wait(timeout: .now() + timeout) == .success else { return false }
        finished.signal()  // so that a second stop() returns at once
        return true
    }

    private func run() {
        while true {
            condition.lock()
            while pending.isEmpty && !stopping { condition.wait() }
            if stopping {
                condition.unlock()
                return
            }
            let batch = pending
            pending.removeAll(keepingCapacity: true)
            queued.removeAll(keepingCapacity: true)
            condition.unlock()
            for notice in batch {
                if condition.withLock({ stopping }) { return }
                send(notice)
            }
        }
    }

    private func send(_ notice: Notice) {
        let code: Int32
        switch notice {
        case .inode(let inode, let data):
            // Offset 0, length 0: the attributes and every cached page; offset -1: the attributes only.
            code = fuse_lowlevel_notify_inval_inode(session, inode, data ? 0 : -1, 0)
        case .entry(let parent, let name):
            code = name.withCString { fuse_lowlevel_notify_inval_entry(session, parent, $0, name.utf8.count) }
        }
        // ENOENT: the kernel no longer holds that inode or name, so there was nothing to forget.
        if code < 0 && code != -ENOENT {
            logger.debug("kernel invalidation \(notice) failed: errno \(-code)")
        } else {
            logger.trace("kernel invalidation \(notice): \(code == 0 ? "done" : "nothing cached")")
        }
    }
}

extension FuseSession {
    /// Starts the invalidation thread of a mounted session and hands it to the filesystem.
    func startNotifier(_ session: OpaquePointer) {
        let notifier = InvalidationNotifier(session: session, logger: logger)
        notifier.start()
        self.notifier = notifier
        filesystem.invalidator = notifier
    }

    /// Stops the invalidation thread; call before the session is unmounted or destroyed. False when it is
    /// stuck in the kernel: the session must then be left undestroyed (the process is ending anyway).
    func stopNotifier() -> Bool {
        filesystem.invalidator = nil
        guard let notifier, !notifier.stop(timeout: 5) else { return true }
        logger.error("the kernel invalidation thread did not stop within 5 s; leaving the FUSE session undestroyed")
        return false
    }
}
