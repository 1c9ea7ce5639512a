import ArgumentParser
import FUSE
import Foundation
import Logging
import RBD
import RBDFS
import Storage

struct Mount: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Mount a Ceph cluster's RBD images at MOUNTPOINT.",
        discussion: """
            Returns once the mount is live, or exits non-zero saying what is wrong. Without --foreground the
            daemon detaches (before it connects to the cluster) and logs to --log-file or syslog.
            SIGTERM / SIGINT flush every image and unmount cleanly.
            """)

    @Argument(help: "An existing, empty directory to mount on.")
    var mountpoint: String

    @OptionGroup var cluster: ClusterOptions

    @Option(help: "Mount one pool as the root instead of all RBD pools.")
    var pool: String?

    @Flag(help: "Show every pool, not only those with the rbd application.")
    var allPools = false

    @Flag(help: "Refuse every change (enforced by the daemon, and the mount is ro).")
    var readOnly = false

    @Flag(help: "Acknowledge every write only once the OSDs have it, as O_SYNC would (default: buffered writes are acknowledged once librbd has them, and a failure reaches the next fsync or close).")
    var sync = false

    @Flag(help: "Let truncate cut off data (like 'rbd resize --allow-shrink').")
    var allowShrink = false

    @Flag(help: "Let rmdir delete an empty pool (the cluster's mon_allow_pool_delete still applies).")
    var allowPoolDelete = false

    @Option(help: "Object size of new images in bytes, a power of two (default: the cluster's, 4 MiB).")
    var objectSize: UInt64?

    @Option(help: "A clone deeper than this many ancestors is flattened at once (0: every clone is a full copy).")
    var maxCloneDepth = 5

    @Option(name: .customLong("connect-timeout"), help: "Seconds to wait for the cluster before giving up.")
    var connectTimeout: Double = 30

    @Option(name: .customLong("io-timeout"), help: "Seconds before an OSD operation fails with ETIMEDOUT (default: wait for ever, riding out 'ceph osd pause' and recoveries).")
    var ioTimeout: Double?

    @Option(help: "FUSE worker threads.")
    var threads = 32

    @Option(name: .customLong("attr-timeout"), help: "Seconds the kernel and rbdfs may reuse names and attributes. Changes other clients make to images open in the mount arrive at once (librbd update watches); images they create or remove show up after at most this long.")
    var attrTimeout: Double = 1

    @Option(name: .customLong("read-ahead-kb"), help: "Kernel readahead of the mount, in KiB (0: the kernel's default).")
    var readAheadKiB = 4096

    @Flag(name: [.short, .long], help: "Stay in the foreground and log to stderr.")
    var foreground = false

    @Option(name: .customLong("log-file"), help: "Append daemon logs to this file instead of syslog.")
    var logFile: String?

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level = .info

    @Option(name: .customShort("o"), help: "FUSE mount options, comma-separated (e.g. allow_other).")
    var fuseOptions: [String] = []

    func validate() throws {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: mountpoint, isDirectory: &isDirectory) else {
            throw ValidationError("mount point \(mountpoint) does not exist")
        }
        guard isDirectory.boolValue else { throw ValidationError("mount point \(mountpoint) is not a directory") }
        guard threads > 0, connectTimeout > 0 else { throw ValidationError("--threads and --connect-timeout must be positive") }
        if let ioTimeout, ioTimeout <= 0 { throw ValidationError("--io-timeout must be positive") }
        guard maxCloneDepth >= 0 else { throw ValidationError("--max-clone-depth must be 0 or more") }
        guard attrTimeout >= 0, attrTimeout <= 86_400 else { throw ValidationError("--attr-timeout must be from 0 to 86400 seconds") }
        if let objectSize, objectSize.nonzeroBitCount != 1 || objectSize < 4096 || objectSize > 32 << 20 {
            throw ValidationError("--object-size must be a power of two from 4096 to 33554432 bytes")
        }
    }

    func run() throws {
        let mountpoint = URL(fileURLWithPath: self.mountpoint).standardizedFileURL.path
        // Never fork after rados_connect (librados' threads would not survive it): detach first.
        let parentLink = foreground ? nil : try Daemon.detach()
        FuseSession.blockTerminationSignals()
        LoggingSystem.bootstrap { label in
            var handler: any LogHandler
            if foreground {
                handler = StreamLogHandler.standardError(label: label)
            } else if let logFile {
                handler = FileLogHandler(label: label, path: logFile)
            } else {
                handler = SyslogLogHandler(label: label)
            }
            handler.logLevel = logLevel
            return handler
        }
        let logger = Logger(label: "rbdfs")
        do {
            let session = try start(at: mountpoint, logger: logger)
            logger.info("mounted at \(mountpoint)")
            parentLink?.reportSuccess()
            let status = session.run()
            logger.info("unmounted \(mountpoint)")
            throw ExitCode(status)
        } catch let error as ExitCode {
            throw error
        } catch {
            logger.error("mount failed: \(error)")
            if let parentLink {
                parentLink.reportFailure("\(error)")
                throw ExitCode.failure
            }
            throw error
        }
    }

    private func start(at mountpoint: String, logger: Logger) throws -> FuseSession {
        let store = try CephStore.connect(
            conf: cluster.conf, id: cluster.id, keyring: cluster.keyring, timeout: connectTimeout, osdOpTimeout: ioTimeout,
            // rbdfs keeps writes in flight itself (InFlightIO), keeping their failures for fsync; librbd's
            // write-around cache would hide a failure from a later flush, and its caches cost memory per image.
            options: ["rbd_cache": "false"],
            logger: logger)
        var options = FSOptions()
        options.pool = pool
        options.allPools = allPools
        options.readOnly = readOnly
        options.allowShrink = allowShrink
        options.allowPoolDelete = allowPoolDelete
        options.objectSize = objectSize
        options.maxCloneDepth = maxCloneDepth
        options.metadataTTL = .milliseconds(Int64((attrTimeout * 1000).rounded()))
        options.uid = getuid()
        options.gid = getgid()
        if let pool {
            let pools = try store.listPools()
            guard pools.contains(where: { $0.name == pool }) else {
                throw MountError("pool '\(pool)' does not exist (pools: \(pools.map { $0.name }.joined(separator: ", ")))")
            }
        }
        let filesystem = RBDFilesystem(store: store, options: options, logger: logger)
        var tuning = FuseTuning()
        tuning.maxThreads = threads
        tuning.entryTimeout = attrTimeout
        tuning.attributeTimeout = attrTimeout
        tuning.writeBehind = !sync
        tuning.readAheadKiB = readAheadKiB > 0 ? readAheadKiB : nil
        let session = FuseSession(filesystem: filesystem, tuning: tuning, logger: logger)
        var mountOptions = ["fsname=rbdfs", "subtype=rbdfs", "default_permissions"]
        if readOnly { mountOptions.append("ro") }
        mountOptions += fuseOptions.flatMap { $0.split(separator: ",").map(String.init) }
        try session.mount(at: mountpoint, options: mountOptions)
        return session
    }
}

struct MountError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// How to reach the cluster; librados reads ceph.conf and the keyring itself.
struct ClusterOptions: ParsableArguments {
    @Option(help: "ceph.conf to read (default: librados' search: $CEPH_CONF, /etc/ceph/ceph.conf, ...).")
    var conf: String?

    @Option(help: "cephx user name without the 'client.' prefix (default: admin).")
    var id: String?

    @Option(help: "cephx keyring file (default: what ceph.conf names).")
    var keyring: String?
}
