import CFuse
import Foundation
import Logging
import RBDFS

public struct FuseError: Error, CustomStringConvertible {
    public var description: String
}

/// How the kernel side of the mount is tuned.
public struct FuseTuning: Sendable {
    /// How long the kernel may reuse a lookup / attributes before asking again. One second keeps changes made
    /// by other clients (the rbd CLI, OpenStack) visible within about a second.
    public var entryTimeout: Double = 1
    public var attributeTimeout: Double = 1
    /// FUSE worker threads: synchronous metadata calls to the cluster block one each.
    public var maxThreads: Int = 32
    /// Largest read / write request: 1 MiB, the kernel's limit of 256 pages.
    public var maxWrite: UInt32 = 1 << 20
    public var maxBackground: UInt32 = 64
    /// The mount's readahead (its bdi's read_ahead_kb): the kernel's default 128 KiB leaves streaming reads
    /// at a fraction of what librbd gives; 4 MiB (one object) more than doubles them. nil leaves it alone.
    public var readAheadKiB: Int? = 4096
    /// Buffered writes are acknowledged once librbd has them (see InFlightIO); false waits for the OSDs.
    public var writeBehind = true

    public init() {}
}

/// A FUSE session serving an `RBDFilesystem` through the libfuse3 low-level API.
public final class FuseSession: @unchecked Sendable {
    let filesystem: RBDFilesystem
    let logger: Logger
    let tuning: FuseTuning
    private var session: OpaquePointer?
    private var mountpoint: String?
    /// `major:minor` of the mount, once mounted.
    private var connectionDevice: String?
    private let traceLock = NSLock()
    private var traces: [Int: (String, ContinuousClock.Instant)] = [:]
    /// Serializes the signal thread's unmount with the end of `run()` (which destroys the session).
    private let teardown = NSLock()
    /// Sends kernel invalidations from a thread of its own; stopped before the session is torn down.
    var notifier: InvalidationNotifier?

    public init(filesystem: RBDFilesystem, tuning: FuseTuning, logger: Logger) {
        self.filesystem = filesystem
        self.tuning = tuning
        self.logger = logger
        filesystem.releaseIdleMemory = { _ = malloc_trim(0) }
    }

    /// Creates the session and mounts it. `options` are `-o` mount options (e.g. `ro`, `allow_other`).
    public func mount(at mountpoint: String, options: [String]) throws {
        var arguments = ["rbdfs"]
        if !options.isEmpty { arguments += ["-o", options.joined(separator: ",")] }
        var cStrings = arguments.map { strdup($0) }
        defer { cStrings.forEach { free($0) } }
        var args = CFuse_args_init(Int32(cStrings.count), &cStrings)
        defer { fuse_opt_free_args(&args) }

        var operations = FuseOperations.table()
        let context = Unmanaged.passUnretained(self).toOpaque()
        guard let session = fuse_session_new(&args, &operations, MemoryLayout<fuse_lowlevel_ops>.size, context) else {
            throw FuseError(description: "could not create the FUSE session (bad mount options: \(options.joined(separator: ",")))")
        }
        guard fuse_session_mount(session, mountpoint) == 0 else {
            fuse_session_destroy(session)
            throw FuseError(description: "could not mount at \(mountpoint) (is /dev/fuse there, and are you root or is fusermount3 installed?)")
        }
        self.session = session
        self.mountpoint = mountpoint
        startNotifier(session)
        connectionDevice = Self.device(of: mountpoint)
        if connectionDevice == nil { logger.warning("\(mountpoint): not in /proc/self/mountinfo") }
        if let readAheadKiB = tuning.readAheadKiB, let device = connectionDevice { setReadAhead(readAheadKiB, device: device) }
    }

    /// The mount's device number (`major:minor`; the minor is the FUSE connection's number), from
    /// /proc/self/mountinfo rather than stat(2): a stat of the mount point would wait for this very daemon,
    /// whose loop is not running yet.
    static func device(of mountpoint: String) -> String? {
        guard let table = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return nil }
        return table.split(separator: "\n").last(where: {
            let fields = $0.split(separator: " ")
            return fields.count > 4 && fields[4] == mountpoint
        }).map { String($0.split(separator: " ")[2]) }
    }

    /// Writes the mount's bdi read_ahead_kb.
    private func setReadAhead(_ kib: Int, device: String) {
        let path = "/sys/class/bdi/\(device)/read_ahead_kb"
        do {
            try "\(kib)\n".write(toFile: path, atomically: false, encoding: .utf8)
            logger.debug("\(path) = \(kib)")
        } catch {
            logger.warning("could not set \(path) to \(kib) (\(error)); streaming reads will be slower")
        }
    }

    /// Aborts this mount's FUSE connection through fusectl (mounting fusectl if it is not yet).
    private func abortConnection() {
        guard let device = connectionDevice, let minor = device.split(separator: ":").last else { return }
        let connections = "/sys/fs/fuse/connections"
        if !FileManager.default.fileExists(atPath: "\(connections)/\(minor)") {
            _ = Glibc.mount("fusectl", connections, "fusectl", 0, nil)
        }
        guard FileManager.default.fileExists(atPath: "\(connections)/\(minor)") else {
            return logger.debug("FUSE connection \(device) already closed")
        }
        do {
            try "1\n".write(toFile: "\(connections)/\(minor)/abort", atomically: false, encoding: .utf8)
            logger.info("aborted the FUSE connection \(device): files still open get ENOTCONN")
        } catch {
            logger.warning("could not abort the FUSE connection \(device) (\(error)); the daemon ends when the last file closes")
        }
    }

    /// The signals that end the mount.
    private static let terminationSignals = [SIGTERM, SIGINT, SIGHUP]

    /// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and every thread it starts later (librados',
    /// libfuse's), so that they reach only the waiting thread `run()` starts. Call before connecting.
    /// (libfuse's own handlers only flag the session: delivered to some librados thread, they would leave the
    /// loop asleep until the next request.)
    public static func blockTerminationSignals() {
        var set = sigset_t()
        sigemptyset(&set)
        for signal in terminationSignals { sigaddset(&set, signal) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// Waits for a termination signal on a thread of its own, then ends the session loop: it flags the
    /// session and detaches the mount, which wakes every worker blocked reading /dev/fuse.
    private func watchTerminationSignals() {
        let thread = Thread { [self] in
            var set = sigset_t()
            sigemptyset(&set)
            for signal in Self.terminationSignals { sigaddset(&set, signal) }
            var received: Int32 = 0
            guard sigwait(&set, &received) == 0 else { return }
            // Held until done, so the loop's end cannot destroy the session under this thread.
            teardown.lock()
            defer { teardown.unlock() }
            guard let session else { return }
            logger.info("signal \(received): flushing every open image, then unmounting \(mountpoint ?? "")")
            filesystem.flushOpenImages()
            _ = stopNotifier()
            fuse_session_exit(session)
            fuse_session_unmount(session)
            // A file still open keeps a detached mount's connection alive, and the workers asleep on
            // /dev/fuse with it: abort the connection so the daemon ends (the data is flushed already).
            abortConnection()
        }
        thread.name = "rbdfs-signals"
        thread.start()
    }

    /// Serves requests until unmounted or signalled (SIGTERM, SIGINT, SIGHUP); then flushes every image and
    /// unmounts. Returns 0 on a clean exit.
    public func run() -> Int32 {
        guard let session else { return 1 }
        watchTerminationSignals()
        let config = fuse_loop_cfg_create()
        fuse_loop_cfg_set_max_threads(config, UInt32(tuning.maxThreads))
        fuse_loop_cfg_set_idle_threads(config, UInt32(max(4, tuning.maxThreads / 2)))
        let status = fuse_session_loop_mt(session, config)
        fuse_loop_cfg_destroy(config)
        logger.info("session loop ended (status \(status)); flushing and unmounting \(mountpoint ?? "")")
        let notifierStopped = stopNotifier()
        filesystem.shutdown()
        teardown.lock()
        fuse_session_unmount(session)
        if notifierStopped { fuse_session_destroy(session) }
        self.session = nil
        teardown.unlock()
        return status < 0 ? 1 : 0
    }

    // MARK: - Tracing (--log-level debug): every request with its outcome and latency

    private var isTracing: Bool { logger.logLevel <= .debug }

    /// Notes when a request arrived (only when tracing).
    func begin(_ request: fuse_req_t, _ operation: String) {
        guard isTracing else { return }
        let key = Int(bitPattern: UnsafeRawPointer(request))
        traceLock.withLock { traces[key] = (operation, .now) }
    }

    /// Logs a request's outcome and latency; call just before replying (the request is freed by the reply).
    func end(_ request: fuse_req_t, _ errno: Int32) {
        guard isTracing else { return }
        let key = Int(bitPattern: UnsafeRawPointer(request))
        guard let (operation, started) = traceLock.withLock({ traces.removeValue(forKey: key) }) else { return }
        let micros = (ContinuousClock.now - started).components
        let elapsed = micros.seconds * 1_000_000 + micros.attoseconds / 1_000_000_000_000
        logger.debug("fuse \(operation): \(errno == 0 ? "ok" : "errno \(errno)") in \(elapsed) µs")
    }

    // MARK: - Replies (the only place that answers the kernel)

    func replyError(_ request: fuse_req_t, _ error: FSError, operation: String) {
        logger.log(level: error.logLevel, "\(operation): \(error) [errno \(error.errno.rawValue)]")
        end(request, error.errno.rawValue)
        fuse_reply_err(request, error.errno.rawValue)
    }

    func replyEntry(_ request: fuse_req_t, _ entry: Entry) {
        end(request, 0)
        var parameters = entryParameters(entry)
        if fuse_reply_entry(request, &parameters) != 0 {
            // The kernel never saw the entry (the request was interrupted): undo its lookup.
            filesystem.forget(entry.inode, count: 1)
        }
    }

    func entryParameters(_ entry: Entry) -> fuse_entry_param {
        var parameters = fuse_entry_param()
        parameters.ino = entry.inode
        parameters.generation = 1
        parameters.attr = Self.stat(entry.attributes)
        parameters.attr_timeout = tuning.attributeTimeout
        parameters.entry_timeout = tuning.entryTimeout
        return parameters
    }

    func replyAttributes(_ request: fuse_req_t, _ attributes: FileAttributes) {
        end(request, 0)
        var st = Self.stat(attributes)
        fuse_reply_attr(request, &st, tuning.attributeTimeout)
    }

    static func stat(_ attributes: FileAttributes) -> stat {
        var st = Glibc.stat()
        st.st_ino = UInt(attributes.inode)
        let type = attributes.kind == .directory ? Glibc.S_IFDIR : Glibc.S_IFREG
        st.st_mode = type | mode_t(attributes.permissions)
        st.st_nlink = UInt(attributes.linkCount)
        st.st_size = off_t(clamping: attributes.size)
        st.st_blocks = blkcnt_t(clamping: attributes.blocks)
        st.st_blksize = blksize_t(attributes.blockSize)
        st.st_uid = attributes.uid
        st.st_gid = attributes.gid
        st.st_atim = timespec(tv_sec: Int(attributes.accessTime.seconds), tv_nsec: Int(attributes.accessTime.nanoseconds))
        st.st_mtim = timespec(tv_sec: Int(attributes.modifyTime.seconds), tv_nsec: Int(attributes.modifyTime.nanoseconds))
        st.st_ctim = timespec(tv_sec: Int(attributes.changeTime.seconds), tv_nsec: Int(attributes.changeTime.nanoseconds))
        return st
    }
}
