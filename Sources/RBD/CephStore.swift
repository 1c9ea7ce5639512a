import Foundation
internal import CRBD
import Logging
import Storage
import SystemPackage

/// The storage protocol on a Ceph cluster, through librados and librbd.
///
/// One `CephStore` is one cluster connection (`rados_t`). Every call may block on the network; I/O on the
/// images it opens is asynchronous (see `CephImage`).
public final class CephStore: BlockStore, @unchecked Sendable {
    let cluster: rados_t
    let logger: Logger

    private let lock = NSLock()
    /// I/O contexts by pool and namespace: cheap to make but not free, and thread-safe. Guarded by `lock`.
    private var ioContexts: [PoolNamespace: IOContext] = [:]
    /// Guarded by `lock`.
    private var isShutDown = false

    private struct PoolNamespace: Hashable {
        var pool: String
        var namespace: String
    }

    private init(cluster: rados_t, logger: Logger) {
        self.cluster = cluster
        self.logger = logger
    }

    deinit {
        shutdown()
    }

    /// Connects to a cluster as `client.<id>` (nil: `client.admin`).
    ///
    /// - Parameters:
    ///   - conf: a `ceph.conf`; nil searches `$CEPH_CONF`, `/etc/ceph/ceph.conf`, `~/.ceph/config` and
    ///     `./ceph.conf`. `CEPH_ARGS` is honoured either way.
    ///   - keyring: a keyring file for cephx; nil leaves it to the configuration.
    ///   - timeout: seconds (rounded up) to reach the monitors, and for each monitor command.
    ///   - osdOpTimeout: seconds (rounded up) before an OSD operation fails with ETIMEDOUT; nil waits for
    ///     ever, so I/O rides out `ceph osd pause` and recoveries.
    ///   - options: further Ceph configuration options, e.g. `["rbd_cache": "false"]`.
    /// - Throws: `StorageError`, at the latest after about `timeout` seconds when no monitor answers.
    public static func connect(
        conf: String?, id: String?, keyring: String?, timeout: Double = 30, osdOpTimeout: Double? = nil,
        options: [String: String] = [:], logger: Logger
    ) throws -> CephStore {
        var handle: rados_t?
        try check(rados_create(&handle, id), "rados_create", "client.\(id ?? "admin")")
        let cluster = handle!
        do {
            let read = rados_conf_read_file(cluster, conf)
            // Without a path, finding no file is fine: CEPH_ARGS or `options` may name the monitors.
            if conf != nil || read != -ENOENT {
                try check(read, "rados_conf_read_file", conf ?? "the default ceph.conf")
            }
            try check(rados_conf_parse_env(cluster, nil), "rados_conf_parse_env", "CEPH_ARGS")
            var settings: [(name: String, value: String)] = []
            if let keyring {
                settings.append(("keyring", keyring))
            }
            settings.append(("client_mount_timeout", wholeSeconds(timeout)))
            settings.append(("rados_mon_op_timeout", wholeSeconds(timeout)))
            if let osdOpTimeout {
                settings.append(("rados_osd_op_timeout", wholeSeconds(osdOpTimeout)))
            }
            for key in options.keys.sorted() {
                settings.append((key, options[key]!))
            }
            // Last, so no option undoes it: `ImageHandle.write` promises the caller's buffer is copied
            // before it returns, which librbd does only with zero-copy writes disabled.
            settings.append(("rbd_disable_zero_copy_writes", "true"))
            for setting in settings {
                try check(rados_conf_set(cluster, setting.name, setting.value), "rados_conf_set",
                          "\(setting.name)=\(setting.value)")
            }
            try check(rados_connect(cluster), "rados_connect", "mon_host \(configValue(cluster, "mon_host"))")
        } catch {
            rados_shutdown(cluster)
            throw error
        }
        let store = CephStore(cluster: cluster, logger: logger)
        store.waitForMonitorMap(within: timeout)
        logger.debug("connected to Ceph cluster", metadata: ["fsid": "\((try? store.fsid()) ?? "?")"])
        return store
    }

    static let unknownFSID = "00000000-0000-0000-0000-000000000000"

    /// `rados_connect` may return before the monitor's map has arrived; until it does, the cluster's fsid
    /// reads as zeros (seen about one connection in twenty on a busy machine). Waits for it, briefly.
    private func waitForMonitorMap(within seconds: Double) {
        let deadline = Date().addingTimeInterval(min(seconds, 10))
        while (try? fsid()) == Self.unknownFSID && Date() < deadline {
            usleep(5_000)
        }
    }

    /// Drops the cached I/O contexts and the cluster connection; a second call does nothing. Close every
    /// image handle first. The corresponding C function is `rados_shutdown`.
    public func shutdown() {
        let wasShutDown: Bool = lock.withLock {
            defer {
                isShutDown = true
                ioContexts = [:]  // destroys them, before the cluster they belong to
            }
            return isShutDown
        }
        guard !wasShutDown else { return }
        rados_shutdown(cluster)
        logger.debug("disconnected from Ceph cluster")
    }

    public func fsid() throws -> String {
        try stringFilled("rados_cluster_fsid", "cluster") { rados_cluster_fsid(cluster, $0, $1) }
    }

    // MARK: Pools

    public func listPools() throws -> [PoolInfo] {
        let pools = try poolIDs()
        forgetIOContexts { context in
            !pools.contains { $0.name == context.pool && $0.id == context.poolID }
        }
        var result: [PoolInfo] = []
        for pool in pools {
            let applications: [String]
            do {
                applications = try self.applications(of: ioContext(pool: pool.name, namespace: ""))
            } catch let error as StorageError where error.errno == .noSuchFileOrDirectory {
                continue  // deleted since it was listed
            }
            result.append(PoolInfo(name: pool.name, id: pool.id, isRBD: applications.contains("rbd")))
        }
        return result
    }

    /// A pool's name by id, from the cluster map librados holds; nil for a pool that is gone.
    func poolName(id: Int64) -> String? {
        try? stringFilled("rados_pool_reverse_lookup", "pool \(id)") { rados_pool_reverse_lookup(cluster, id, $0, $1) }
    }

    /// Every pool's name and id (a pool deleted while they are looked up left out).
    func poolIDs() throws -> [(name: String, id: Int64)] {
        var pools: [(name: String, id: Int64)] = []
        for name in try poolNames() {
            let id = rados_pool_lookup(cluster, name)
            if id == -ENOENT { continue }  // deleted since it was listed
            pools.append((name, try check(id, "rados_pool_lookup", name)))
        }
        return pools
    }

    func poolNames() throws -> [String] {
        var capacity = 4096
        while true {
            var buffer = [CChar](repeating: 0, count: capacity)
            // Answers the length it needs, filling what fits.
            let needed = Int(try check(rados_pool_list(cluster, &buffer, capacity), "rados_pool_list", "cluster"))
            if needed <= capacity {
                return nulSeparatedStrings(buffer, byteCount: needed)
            }
            capacity = needed
        }
    }

    /// The applications enabled on a pool (`rbd`, `rgw`, `cephfs`, ...).
    private func applications(of io: IOContext) throws -> [String] {
        try withFilledArray(of: CChar.self, count: 256, { names, count in
            rados_application_list(io.raw, names, &count)
        }) { code, names, count in
            try check(code, "rados_application_list", io.pool)
            return nulSeparatedStrings(names, byteCount: count)
        }
    }

    /// A replicated pool with the cluster's defaults, tagged for RBD and initialised as `rbd pool init` does.
    public func createPool(_ name: String) throws {
        try check(rados_pool_create(cluster, name), "rados_pool_create", name)
        let io = try ioContext(pool: name, namespace: "")
        try check(rados_application_enable(io.raw, "rbd", 1), "rados_application_enable", name)
        try check(rbd_pool_init(io.raw, false), "rbd_pool_init", name)
    }

    /// EPERM unless the monitors allow it (`mon_allow_pool_delete`).
    public func deletePool(_ name: String) throws {
        forgetIOContexts { $0.pool == name }
        try check(rados_pool_delete(cluster, name), "rados_pool_delete", name)
    }

    // MARK: Namespaces

    public func listNamespaces(pool: String) throws -> [String] {
        let io = try ioContext(pool: pool, namespace: "")
        return try withFilledArray(of: CChar.self, count: 1024, { names, count in
            rbd_namespace_list(io.raw, names, &count)
        }) { code, names, _ in
            // Answers the length it filled.
            let length = Int(try check(code, "rbd_namespace_list", pool))
            return nulSeparatedStrings(names, byteCount: length)
        }
    }

    public func createNamespace(pool: String, name: String) throws {
        let io = try ioContext(pool: pool, namespace: "")
        try check(rbd_namespace_create(io.raw, name), "rbd_namespace_create", "\(pool)/\(name)")
    }

    /// EBUSY while the namespace holds images.
    public func removeNamespace(pool: String, name: String) throws {
        let io = try ioContext(pool: pool, namespace: "")
        try check(rbd_namespace_remove(io.raw, name), "rbd_namespace_remove", "\(pool)/\(name)")
        forgetIOContexts { $0.pool == pool && $0.namespace == name }
    }

    // MARK: Images

    /// Sorted by name. The corresponding C function is `rbd_list2`.
    public func listImages(pool: String, namespace: String) throws -> [String] {
        let io = try ioContext(pool: pool, namespace: namespace)
        return try withFilledArray(of: rbd_image_spec_t.self, count: 256, { specs, count in
            rbd_list2(io.raw, specs, &count)
        }) { code, specs, count in
            try check(code, "rbd_list2", io.description)
            defer { rbd_image_spec_list_cleanup(specs, count) }
            let names: [String] = UnsafeBufferPointer(start: specs, count: count).map { string($0.name) }
            return names.sorted()
        }
    }

    /// A snapshot is always opened read-only.
    public func openImage(_ spec: ImageSpec, snapshot: String?, readOnly: Bool) throws -> any ImageHandle {
        let io = try ioContext(for: spec)
        return try CephImage(opening: spec, snapshot: snapshot, readOnly: readOnly, in: io, logger: logger)
    }

    /// A format-2 image. EINVAL for an object size that is not a power of two. The corresponding C function
    /// is `rbd_create4`.
    public func createImage(_ spec: ImageSpec, size: UInt64, options: ImageCreateOptions) throws {
        let io = try ioContext(for: spec)
        try withImageOptions(options, "rbd_create4", spec.description) { imageOptions in
            try check(rbd_create4(io.raw, spec.name, size, imageOptions), "rbd_create4", spec.description)
        }
    }

    public func removeImage(_ spec: ImageSpec) throws {
        let io = try ioContext(for: spec)
        try check(rbd_remove(io.raw, spec.name), "rbd_remove", spec.description)
    }

    public func renameImage(_ spec: ImageSpec, to newName: String) throws {
        let io = try ioContext(for: spec)
        try check(rbd_rename(io.raw, spec.name, newName), "rbd_rename", spec.description)
    }

    /// The clone format is the cluster's choice (`rbd_default_clone_format`: v1, which needs a protected
    /// snapshot, until every client is mimic or newer), except across namespaces, which only v2 supports.
    /// The corresponding C function is `rbd_clone3`.
    public func cloneImage(parent: ImageSpec, snapshot: String, child: ImageSpec, options: ImageCreateOptions) throws {
        let parentIO = try ioContext(for: parent)
        let childIO = try ioContext(for: child)
        let target = "\(parent.describing(snapshot: snapshot)) -> \(child)"
        let cloneFormat: UInt64? = parent.namespace == child.namespace ? nil : 2
        try withImageOptions(options, cloneFormat: cloneFormat, "rbd_clone3", target) { imageOptions in
            try check(rbd_clone3(parentIO.raw, parent.name, snapshot, childIO.raw, child.name, imageOptions),
                      "rbd_clone3", target)
        }
    }

    /// The corresponding C function is `rbd_list_children3`.
    public func children(of spec: ImageSpec, snapshot: String) throws -> [ImageSpec] {
        let io = try ioContext(for: spec)
        let parent = try CephImage(opening: spec, snapshot: snapshot, readOnly: true, in: io, logger: logger)
        defer { parent.close() }
        return try parent.children()
    }

    /// Calls `body` with librbd image options for a format-2 image made with `options`.
    private func withImageOptions(
        _ options: ImageCreateOptions, cloneFormat: UInt64? = nil, _ operation: String, _ target: String,
        _ body: (rbd_image_options_t) throws -> Void
    ) throws {
        var values: [(option: Int32, value: UInt64)] = [(Int32(RBD_IMAGE_OPTION_FORMAT), 2)]
        if let objectSize = options.objectSize {
            guard objectSize.nonzeroBitCount == 1 else {
                throw StorageError(.invalidArgument, operation: operation, target: target)
            }
            values.append((Int32(RBD_IMAGE_OPTION_ORDER), UInt64(objectSize.trailingZeroBitCount)))
        }
        if let features = options.features {
            values.append((Int32(RBD_IMAGE_OPTION_FEATURES), features))
        }
        if let cloneFormat {
            values.append((Int32(RBD_IMAGE_OPTION_CLONE_FORMAT), cloneFormat))
        }
        var handle: rbd_image_options_t?
        rbd_image_options_create(&handle)
        let imageOptions = handle!
        defer { rbd_image_options_destroy(imageOptions) }
        for entry in values {
            try check(rbd_image_options_set_uint64(imageOptions, entry.option, entry.value),
                      "rbd_image_options_set_uint64", target)
        }
        try body(imageOptions)
    }

    // MARK: Usage

    public func clusterStats() throws -> StorageStats {
        let stat = try clusterStat()
        return StorageStats(totalBytes: stat.kb * 1024, usedBytes: stat.kb_used * 1024,
                            availableBytes: stat.kb_avail * 1024, objects: stat.num_objects)
    }

    /// A pool has no size of its own: it may grow into whatever the cluster has free, so its total is what
    /// it uses plus that. Used bytes are the pool's stored data, before replication.
    public func poolStats(pool: String) throws -> StorageStats {
        let io = try ioContext(pool: pool, namespace: "")
        var stat = rados_pool_stat_t()
        try check(rados_ioctx_pool_stat(io.raw, &stat), "rados_ioctx_pool_stat", pool)
        let available = try clusterStat().kb_avail * 1024
        return StorageStats(totalBytes: stat.num_bytes + available, usedBytes: stat.num_bytes,
                            availableBytes: available, objects: stat.num_objects)
    }

    private func clusterStat() throws -> rados_cluster_stat_t {
        var stat = rados_cluster_stat_t()
        try check(rados_cluster_stat(cluster, &stat), "rados_cluster_stat", "cluster")
        return stat
    }

    // MARK: I/O contexts

    func ioContext(for spec: ImageSpec) throws -> IOContext {
        try ioContext(pool: spec.pool, namespace: spec.namespace)
    }

    func ioContext(pool: String, namespace: String) throws -> IOContext {
        let key = PoolNamespace(pool: pool, namespace: namespace)
        if let cached = lock.withLock({ ioContexts[key] }) {
            return cached
        }
        let made = try IOContext(cluster: cluster, pool: pool, namespace: namespace)
        return lock.withLock {
            if let raced = ioContexts[key] { return raced }
            ioContexts[key] = made
            return made
        }
    }

    /// Drops cached I/O contexts of pools that were deleted (or deleted and made again under the same name).
    private func forgetIOContexts(where isStale: (IOContext) -> Bool) {
        lock.withLock { ioContexts = ioContexts.filter { !isStale($0.value) } }
    }
}

/// Ceph takes whole seconds for its timeouts ("2.5" is EINVAL).
private func wholeSeconds(_ seconds: Double) -> String {
    String(max(1, Int(seconds.rounded(.up))))
}

/// A configuration value as the cluster handle sees it (4 KiB fits any monitor list), or "" if unreadable.
private func configValue(_ cluster: rados_t, _ option: String) -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    guard rados_conf_get(cluster, option, &buffer, buffer.count) == 0 else { return "" }
    return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
}
