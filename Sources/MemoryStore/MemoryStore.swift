import Dispatch
import Foundation
import Storage
import SystemPackage

/// A whole Ceph cluster in memory: pools, RBD namespaces, thin images, snapshots and clones, with librbd's
/// rules and errno values, so the filesystem can be tested without a cluster.
///
/// What it mirrors (and where it is stricter or simpler than librbd) is written next to each operation.
/// Failures are `StorageError`s named after the librbd / librados call they stand for (`rbd_remove`,
/// `rbd_aio_write`, ...); the same names select calls for `injectFault` and count them in `callCounts`.
///
/// Asynchronous I/O runs on a serial queue per image, in issue order, and completes there (or inline,
/// with `completeSynchronously`, for deterministic single-threaded tests). Everything else happens under
/// one lock, so the store and its handles may be used from any thread.
public final class MemoryStore: BlockStore, @unchecked Sendable {
    public static let defaultFSID = "5d3b0c4e-8f2a-4b1d-9e6c-7a0f3d2b1c58"
    public static let defaultObjectSize: UInt64 = 4 << 20
    /// layering | exclusive-lock | object-map | fast-diff | deep-flatten, librbd's `rbd_default_features`.
    public static let defaultFeatures: UInt64 = 61
    public static let defaultCapacity: UInt64 = 100 << 30

    /// Wall-clock time, the default source of image timestamps.
    public static let systemClock: @Sendable () -> Timestamp = {
        let now = Date().timeIntervalSince1970
        let seconds = now.rounded(.down)
        return Timestamp(seconds: Int64(seconds), nanoseconds: Int64((now - seconds) * 1_000_000_000))
    }

    let clusterFSID: String
    /// The object size of images created without one (`rbd_default_order`).
    let defaultImageObjectSize: UInt64
    let defaultImageFeatures: UInt64
    let capacity: UInt64
    let clock: @Sendable () -> Timestamp

    // Everything below is guarded by `lock`.
    let lock = NSLock()
    var pools: [String: PoolRecord] = [:]
    var nextPoolID: Int64 = 1
    /// Images by id: clones point at their parent by id, so renames and moves never break the link.
    var images: [String: ImageRecord] = [:]
    /// Snapshot ids only grow, across the whole cluster (Ceph allocates them per pool; unique is enough).
    var nextSnapshotID: UInt64 = 1
    var nextGeneration: UInt64 = 1
    var openHandles: [UInt64: OpenHandleRecord] = [:]
    var nextHandleSerial: UInt64 = 1
    var faults: [InjectedFault] = []
    var calls: [String: Int] = [:]
    var synchronousCompletions: Bool
    /// Update handlers to call once the lock is released (never under it: a handler may call the store).
    var pendingNotifications: [@Sendable () -> Void] = []
    let notificationQueue = DispatchQueue(label: "MemoryStore.notifications")

    /// - Parameters:
    ///   - pools: pools that exist from the start, all initialised for RBD.
    ///   - objectSize: object size of images created without one.
    ///   - capacity: the cluster's raw capacity, as `df` reports it.
    ///   - completeSynchronously: run I/O and call completions (and update handlers) before the call returns.
    ///   - clock: the source of every timestamp (images, snapshots).
    public init(
        pools: [String] = ["images", "volumes", "vms"],
        fsid: String = MemoryStore.defaultFSID,
        objectSize: UInt64 = MemoryStore.defaultObjectSize,
        features: UInt64 = MemoryStore.defaultFeatures,
        capacity: UInt64 = MemoryStore.defaultCapacity,
        completeSynchronously: Bool = false,
        clock: @escaping @Sendable () -> Timestamp = MemoryStore.systemClock
    ) {
        self.clusterFSID = fsid
        self.defaultImageObjectSize = objectSize
        self.defaultImageFeatures = features
        self.capacity = capacity
        self.synchronousCompletions = completeSynchronously
        self.clock = clock
        for name in pools where self.pools[name] == nil {
            self.pools[name] = PoolRecord(id: nextPoolID, namespaces: ["": [:]])
            nextPoolID += 1
        }
    }

    // MARK: - Test controls

    /// When true, I/O runs and completes (and update handlers run) on the caller's thread before the call
    /// returns. Meant for single-threaded tests: completions of one image are then serialised only by the caller.
    public var completeSynchronously: Bool {
        get { locked { synchronousCompletions } }
        set { locked { synchronousCompletions = newValue } }
    }

    /// Makes the next `count` calls of `operation` fail with `errno`, optionally only those on `image`
    /// (an image name, `pool/name`, or for pool and namespace calls their target, e.g. `images`).
    /// Operations are librbd call names: `rbd_open` (which also covers `rbd_open_read_only`), `rbd_aio_read`,
    /// `rbd_aio_write`, `rbd_aio_discard`, `rbd_aio_write_zeroes`, `rbd_aio_flush`, `rbd_resize2`,
    /// `rbd_create4`, `rbd_remove`, `rbd_snap_create`, ... (see `callCounts` for the names a test exercised);
    /// `describe_snapshot` stands for the metadata reads of `describeSnapshots`, one per snapshot.
    /// A fault on an asynchronous call is reported through its completion, and the call has no effect.
    public func injectFault(_ errno: Errno, operation: String, image: String? = nil, count: Int = 1) {
        guard count > 0 else { return }
        locked { faults.append(InjectedFault(errno: errno, operation: operation, image: image, remaining: count)) }
    }

    /// Drops every fault not yet triggered.
    public func clearFaults() {
        locked { faults.removeAll() }
    }

    /// How many times each operation was called (including calls that failed), by librbd call name.
    public var callCounts: [String: Int] {
        locked { calls }
    }

    public func callCount(_ operation: String) -> Int {
        locked { calls[operation, default: 0] }
    }

    public func resetCallCounts() {
        locked { calls.removeAll() }
    }

    /// Objects holding the image head's own data (not its parent's, not only its snapshots'); 0 if there is
    /// no such image. Lets a test see that a write of zeros was skipped or a discard released space.
    public func rawObjectCount(of spec: ImageSpec) -> Int {
        locked {
            guard let id = pools[spec.pool]?.namespaces[spec.namespace]?[spec.name] else { return 0 }
            return images[id]?.objects.count ?? 0
        }
    }

    /// Handles of the image that are open and not yet closed (snapshot handles included).
    public func openHandleCount(of spec: ImageSpec) -> Int {
        locked {
            guard let id = pools[spec.pool]?.namespaces[spec.namespace]?[spec.name] else { return 0 }
            return openHandles.values.filter { $0.imageID == id }.count
        }
    }

    /// Waits until the I/O and update notifications issued before this call have completed.
    /// Never call it from a completion or an update handler.
    public func waitForCompletions() {
        let queues = locked { images.values.map(\.completionQueue) }
        for queue in queues {
            queue.sync {}
        }
        notificationQueue.sync {}
    }

    // MARK: - Cluster and pools

    public func fsid() throws -> String {
        try locked {
            try beginCall("rados_cluster_fsid", target: "cluster")
            return clusterFSID
        }
    }

    public func listPools() throws -> [PoolInfo] {
        try locked {
            try beginCall("rados_pool_list", target: "cluster")
            return pools.map { PoolInfo(name: $0.key, id: $0.value.id, isRBD: true) }.sorted { $0.id < $1.id }
        }
    }

    /// EEXIST if the pool exists.
    public func createPool(_ name: String) throws {
        try locked {
            let operation = "rados_pool_create"
            try beginCall(operation, target: name)
            guard !name.isEmpty else { throw StorageError(.invalidArgument, operation: operation, target: name) }
            guard pools[name] == nil else { throw StorageError(.fileExists, operation: operation, target: name) }
            pools[name] = PoolRecord(id: nextPoolID, namespaces: ["": [:]])
            nextPoolID += 1
        }
    }

    /// Deletes the pool and every image in it, as Ceph does (when `mon_allow_pool_delete` lets it): clones
    /// in other pools whose parent was here then fail with ENOENT, as librbd fails to open their parent.
    public func deletePool(_ name: String) throws {
        try locked {
            let operation = "rados_pool_delete"
            try beginCall(operation, target: name)
            guard let pool = pools.removeValue(forKey: name) else {
                throw StorageError(.noSuchFileOrDirectory, operation: operation, target: name)
            }
            for imageID in pool.namespaces.values.flatMap(\.values) {
                images[imageID] = nil
                notifyHandles(of: imageID, except: nil)
            }
        }
    }

    public func clusterStats() throws -> StorageStats {
        try locked {
            try beginCall("rados_cluster_stat", target: "cluster")
            return stats(ofImages: Array(images.keys))
        }
    }

    public func poolStats(pool: String) throws -> StorageStats {
        try locked {
            let operation = "rados_ioctx_pool_stat"
            try beginCall(operation, target: pool)
            let record = try poolRecord(pool, operation: operation, target: pool)
            return stats(ofImages: record.namespaces.values.flatMap(\.values))
        }
    }

    // MARK: - Namespaces

    public func listNamespaces(pool: String) throws -> [String] {
        try locked {
            let operation = "rbd_namespace_list"
            try beginCall(operation, target: pool)
            return try poolRecord(pool, operation: operation, target: pool).namespaces.keys
                .filter { !$0.isEmpty }.sorted()
        }
    }

    /// EEXIST if it exists, EINVAL for the default namespace's empty name.
    public func createNamespace(pool: String, name: String) throws {
        try locked {
            let operation = "rbd_namespace_create"
            let target = "\(pool)/\(name)"
            try beginCall(operation, target: target)
            _ = try poolRecord(pool, operation: operation, target: target)
            guard !name.isEmpty else { throw StorageError(.invalidArgument, operation: operation, target: target) }
            guard pools[pool]!.namespaces[name] == nil else {
                throw StorageError(.fileExists, operation: operation, target: target)
            }
            pools[pool]!.namespaces[name] = [:]
        }
    }

    /// ENOENT if missing; EBUSY while it holds images, as librbd refuses.
    public func removeNamespace(pool: String, name: String) throws {
        try locked {
            let operation = "rbd_namespace_remove"
            let target = "\(pool)/\(name)"
            try beginCall(operation, target: target)
            let record = try poolRecord(pool, operation: operation, target: target)
            guard !name.isEmpty else { throw StorageError(.invalidArgument, operation: operation, target: target) }
            guard let namespaceImages = record.namespaces[name] else {
                throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
            }
            guard namespaceImages.isEmpty else {
                throw StorageError(.resourceBusy, operation: operation, target: target)
            }
            pools[pool]!.namespaces[name] = nil
        }
    }

    // MARK: - Images

    /// ENOENT for a missing pool or namespace (librbd lists a missing namespace as empty; a filesystem
    /// wants to know it is gone).
    public func listImages(pool: String, namespace: String) throws -> [String] {
        try locked {
            let operation = "rbd_list2"
            let target = namespace.isEmpty ? pool : "\(pool)/\(namespace)"
            try beginCall(operation, target: target)
            return try directory(pool: pool, namespace: namespace, operation: operation, target: target)
                .keys.sorted()
        }
    }

    /// Each name counts as one `rbd_open_read_only` (faults on it fail just that entry).
    public func describeImages(pool: String, namespace: String, names: [String])
        -> [String: Result<ImageSummary, StorageError>] {
        locked {
            var summaries: [String: Result<ImageSummary, StorageError>] = [:]
            for name in names {
                let spec = ImageSpec(pool: pool, namespace: namespace, name: name)
                summaries[name] = catching(operation: "rbd_open_read_only", target: spec.description) {
                    let operation = "rbd_open_read_only"
                    try beginCall(operation, spec: spec)
                    let image = try imageRecord(spec, operation: operation)
                    return ImageSummary(
                        info: try imageInfo(image, snapshot: nil, operation: operation, target: spec.description),
                        snapshots: image.snapshots.map(snapshotInfo),
                        usedBytes: image.headVersion.ownUsedBytes)
                }
            }
            return summaries
        }
    }

    /// What a handle open at each snapshot reports: its clones and used bytes. Each snapshot counts as one
    /// `describe_snapshot` call (standing for the Ceph store's metadata reads; a fault on it fails just that
    /// snapshot). Found by name, and failing as opening it would: ENOENT for a missing image or snapshot, or
    /// a clone whose parent is gone.
    public func describeSnapshots(_ snapshots: [SnapshotReference])
        -> [SnapshotReference: Result<SnapshotDetails, StorageError>] {
        locked {
            let operation = "describe_snapshot"
            var details: [SnapshotReference: Result<SnapshotDetails, StorageError>] = [:]
            for reference in snapshots {
                let target = reference.description
                details[reference] = catching(operation: operation, target: target) {
                    try beginCall(operation, spec: reference.image, target: target)
                    let image = try imageRecord(reference.image, operation: operation, target: target)
                    guard let snapshot = image.snapshot(named: reference.snapshot.name) else {
                        throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
                    }
                    var parent = snapshot.parent
                    while let link = parent {
                        parent = try parentVersion(link, operation: operation, target: target).parent
                    }
                    return SnapshotDetails(children: children(ofImage: image.id, snapshotID: snapshot.id),
                                           usedBytes: image.version(of: snapshot).ownUsedBytes)
                }
            }
            return details
        }
    }

    /// ENOENT for a missing image or snapshot (or a clone whose parent is gone). A snapshot is always
    /// opened read-only. A read-write open of the head registers a watcher (and blocks `removeImage`).
    public func openImage(_ spec: ImageSpec, snapshot: String?, readOnly: Bool) throws -> any ImageHandle {
        try locked {
            let isReadOnly = readOnly || snapshot != nil
            let operation = isReadOnly ? "rbd_open_read_only" : "rbd_open"
            let target = spec.describing(snapshot: snapshot)
            try beginCall(operation, spec: spec, target: target)
            let image = try imageRecord(spec, operation: operation, target: target)
            var snapshotID: UInt64?
            var parent = image.parent
            if let snapshot {
                guard let record = image.snapshot(named: snapshot) else {
                    throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
                }
                snapshotID = record.id
                parent = record.parent
            }
            // librbd opens the whole parent chain with the image.
            while let link = parent {
                parent = try parentVersion(link, operation: operation, target: target).parent
            }
            let serial = nextHandleSerial
            nextHandleSerial += 1
            openHandles[serial] = OpenHandleRecord(imageID: image.id, isWatcher: !isReadOnly, updateHandlers: [])
            return MemoryImageHandle(
                store: self, serial: serial, imageID: image.id, spec: spec, snapshot: snapshot,
                snapshotID: snapshotID, isReadOnly: isReadOnly, completionQueue: image.completionQueue)
        }
    }

    /// EEXIST if the name is taken; ENOENT for a missing pool or namespace; an object size that is not a
    /// power of two is EINVAL and one outside librbd's orders 12...25 (4 KiB ... 32 MiB) is EDOM; feature
    /// sets librbd rejects are EINVAL (object-map without exclusive-lock, ...) or ENOSYS (unknown bits).
    public func createImage(_ spec: ImageSpec, size: UInt64, options: ImageCreateOptions) throws {
        try locked {
            let operation = "rbd_create4"
            try beginCall(operation, spec: spec)
            let target = spec.description
            _ = try directory(pool: spec.pool, namespace: spec.namespace, operation: operation, target: target)
            guard !spec.name.isEmpty else { throw StorageError(.invalidArgument, operation: operation, target: target) }
            let objectSize = try validatedObjectSize(options.objectSize ?? defaultImageObjectSize,
                                                     operation: operation, target: target)
            let features = options.features ?? defaultImageFeatures
            try validateFeatures(features, operation: operation, target: target)
            try addImage(spec, size: size, objectSize: objectSize, features: features, parent: nil,
                         operation: operation)
        }
    }

    /// As librbd's `rbd_remove`: ENOENT if missing, ENOTEMPTY while it has snapshots (which is also what a
    /// parent with clones gets: its clones hang off snapshots), EBUSY while a read-write handle (a watcher,
    /// this process's own included) is open.
    public func removeImage(_ spec: ImageSpec) throws {
        try locked {
            let operation = "rbd_remove"
            try beginCall(operation, spec: spec)
            let image = try imageRecord(spec, operation: operation)
            // librbd's PreRemoveRequest checks snapshots before watchers.
            guard image.snapshots.isEmpty else {
                throw StorageError(.directoryNotEmpty, operation: operation, target: spec.description)
            }
            guard !openHandles.values.contains(where: { $0.imageID == image.id && $0.isWatcher }) else {
                throw StorageError(.resourceBusy, operation: operation, target: spec.description)
            }
            pools[spec.pool]!.namespaces[spec.namespace]![spec.name] = nil
            images[image.id] = nil
            notifyHandles(of: image.id, except: nil)  // read-only handles: their image is gone
            if let parent = image.parent {
                notifyHandles(of: parent.imageID, except: nil)  // its snapshot lost a child
            }
        }
    }

    /// ENOENT if missing, EEXIST if the new name is taken (the same name included). Open handles keep working.
    public func renameImage(_ spec: ImageSpec, to newName: String) throws {
        try locked {
            let operation = "rbd_rename"
            try beginCall(operation, spec: spec)
            let image = try imageRecord(spec, operation: operation)
            let newSpec = ImageSpec(pool: spec.pool, namespace: spec.namespace, name: newName)
            guard !newName.isEmpty else {
                throw StorageError(.invalidArgument, operation: operation, target: newSpec.description)
            }
            guard pools[spec.pool]!.namespaces[spec.namespace]![newName] == nil else {
                throw StorageError(.fileExists, operation: operation, target: newSpec.description)
            }
            pools[spec.pool]!.namespaces[spec.namespace]![spec.name] = nil
            pools[spec.pool]!.namespaces[spec.namespace]![newName] = image.id
            image.location = newSpec
            notifyHandles(of: image.id, except: nil)
        }
    }

    /// As `rbd_clone3` with clone format 1: the parent snapshot must be protected (EINVAL otherwise) and the
    /// parent must have the layering feature (ENOSYS). The child gets the snapshot's size and, unless told,
    /// the parent's object size and features, as librbd does (given features must include layering: ENOSYS).
    public func cloneImage(parent: ImageSpec, snapshot: String, child: ImageSpec,
                           options: ImageCreateOptions) throws {
        try locked {
            let operation = "rbd_clone3"
            try beginCall(operation, spec: child)
            let parentTarget = parent.describing(snapshot: snapshot)
            let parentImage = try imageRecord(parent, operation: operation, target: parentTarget)
            guard let parentSnapshot = parentImage.snapshot(named: snapshot) else {
                throw StorageError(.noSuchFileOrDirectory, operation: operation, target: parentTarget)
            }
            guard parentImage.features & RBDFeature.layering != 0 else {
                throw StorageError(.noFunction, operation: operation, target: parentTarget)
            }
            guard parentSnapshot.isProtected else {
                throw StorageError(.invalidArgument, operation: operation, target: parentTarget)
            }
            let target = child.description
            _ = try directory(pool: child.pool, namespace: child.namespace, operation: operation, target: target)
            guard !child.name.isEmpty else { throw StorageError(.invalidArgument, operation: operation, target: target) }
            let objectSize = try validatedObjectSize(options.objectSize ?? parentImage.objectSize,
                                                     operation: operation, target: target)
            let features = options.features ?? parentImage.features
            try validateFeatures(features, operation: operation, target: target)
            guard features & RBDFeature.layering != 0 else {
                throw StorageError(.noFunction, operation: operation, target: target)
            }
            let link = ParentLink(imageID: parentImage.id, snapshotID: parentSnapshot.id,
                                  overlap: parentSnapshot.size)
            try addImage(child, size: parentSnapshot.size, objectSize: objectSize, features: features,
                         parent: link, operation: operation)
            notifyHandles(of: parentImage.id, except: nil)  // its snapshot gained a child
        }
    }

    /// Images whose head or any snapshot reads through this snapshot (a flattened clone stays a child
    /// while its own snapshots still use the parent, as in librbd). ENOENT for a missing image or snapshot.
    public func children(of spec: ImageSpec, snapshot: String) throws -> [ImageSpec] {
        try locked {
            let operation = "rbd_list_children3"
            let target = spec.describing(snapshot: snapshot)
            try beginCall(operation, spec: spec, target: target)
            let image = try imageRecord(spec, operation: operation, target: target)
            guard let record = image.snapshot(named: snapshot) else {
                throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
            }
            return children(ofImage: image.id, snapshotID: record.id)
        }
    }
}

// MARK: - Internals shared with the handles (the caller holds the lock unless said otherwise)

struct PoolRecord {
    var id: Int64
    /// Namespace ("" is the default one) → image name → image id.
    var namespaces: [String: [String: String]]
}

struct OpenHandleRecord {
    var imageID: String
    /// Opened read-write at the head: librbd registers a watch on the image header.
    var isWatcher: Bool
    var updateHandlers: [@Sendable () -> Void]
}

/// `RBD_FEATURE_*` bits of librbd.h.
enum RBDFeature {
    static let layering: UInt64 = 1 << 0
    static let exclusiveLock: UInt64 = 1 << 2
    static let objectMap: UInt64 = 1 << 3
    static let fastDiff: UInt64 = 1 << 4
    static let journaling: UInt64 = 1 << 6
    /// operations, migrating, non-primary, dirty-cache: set by librbd itself, never by a creator.
    static let internalOnly: UInt64 = (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11)
    static let all: UInt64 = (1 << 12) - 1
}

extension MemoryStore {
    /// Runs `body` under the lock, then delivers the update notifications it queued (outside the lock).
    func locked<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer {
            let notifications = pendingNotifications
            pendingNotifications = []
            let synchronous = synchronousCompletions
            lock.unlock()
            if !notifications.isEmpty {
                if synchronous {
                    notifications.forEach { $0() }
                } else {
                    notificationQueue.async { notifications.forEach { $0() } }
                }
            }
        }
        return try body()
    }

    /// Counts the call and throws the injected fault meant for it, if any.
    func beginCall(_ operation: String, spec: ImageSpec? = nil, target: String? = nil) throws {
        let target = target ?? spec?.description ?? ""
        calls[operation, default: 0] += 1
        guard let index = faults.firstIndex(where: { $0.matches(operation: operation, spec: spec, target: target) })
        else { return }
        let fault = faults[index]
        faults[index].remaining -= 1
        if faults[index].remaining == 0 {
            faults.remove(at: index)
        }
        throw StorageError(fault.errno, operation: operation, target: target)
    }

    /// Runs `body`, turning what it throws into the `Result` a completion or summary carries.
    func catching<T>(operation: String, target: String, _ body: () throws -> T) -> Result<T, StorageError> {
        do {
            return .success(try body())
        } catch let error as StorageError {
            return .failure(error)
        } catch {
            return .failure(StorageError(.ioError, operation: operation, target: target))
        }
    }

    func poolRecord(_ pool: String, operation: String, target: String) throws -> PoolRecord {
        guard let record = pools[pool] else {
            throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
        }
        return record
    }

    /// The image names of one namespace: ENOENT if the pool or namespace is missing.
    func directory(pool: String, namespace: String, operation: String, target: String) throws -> [String: String] {
        guard let directory = try poolRecord(pool, operation: operation, target: target).namespaces[namespace] else {
            throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
        }
        return directory
    }

    func imageRecord(_ spec: ImageSpec, operation: String, target: String? = nil) throws -> ImageRecord {
        let target = target ?? spec.description
        let directory = try directory(pool: spec.pool, namespace: spec.namespace, operation: operation, target: target)
        guard let id = directory[spec.name], let image = images[id] else {
            throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
        }
        return image
    }

    /// The snapshot a clone reads through; ENOENT if it is gone (its pool was deleted).
    func parentVersion(_ link: ParentLink, operation: String, target: String) throws -> DataVersion {
        guard let image = images[link.imageID], let index = image.snapshotIndex(id: link.snapshotID) else {
            throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
        }
        return image.version(of: image.snapshots[index])
    }

    func validatedObjectSize(_ objectSize: UInt64, operation: String, target: String) throws -> UInt64 {
        guard objectSize > 0, objectSize & (objectSize - 1) == 0 else {
            throw StorageError(.invalidArgument, operation: operation, target: target)
        }
        guard (12...25).contains(objectSize.trailingZeroBitCount) else {
            throw StorageError(.outOfDomain, operation: operation, target: target)
        }
        return objectSize
    }

    /// librbd's feature checks at create and clone time.
    func validateFeatures(_ features: UInt64, operation: String, target: String) throws {
        guard features & ~RBDFeature.all == 0 else {
            throw StorageError(.noFunction, operation: operation, target: target)
        }
        let requiresMissing =
            features & RBDFeature.internalOnly != 0
            || (features & RBDFeature.objectMap != 0 && features & RBDFeature.exclusiveLock == 0)
            || (features & RBDFeature.fastDiff != 0 && features & RBDFeature.objectMap == 0)
            || (features & RBDFeature.journaling != 0 && features & RBDFeature.exclusiveLock == 0)
        guard !requiresMissing else {
            throw StorageError(.invalidArgument, operation: operation, target: target)
        }
    }

    func addImage(_ spec: ImageSpec, size: UInt64, objectSize: UInt64, features: UInt64, parent: ParentLink?,
                  operation: String) throws {
        guard pools[spec.pool]!.namespaces[spec.namespace]![spec.name] == nil else {
            throw StorageError(.fileExists, operation: operation, target: spec.description)
        }
        var id: String
        repeat {
            // librbd ids are short hex strings (the client's global id and a random part).
            id = String(UInt64.random(in: 0x1000_0000_0000...0xffff_ffff_ffff), radix: 16)
        } while images[id] != nil
        images[id] = ImageRecord(id: id, location: spec, size: size, objectSize: objectSize, features: features,
                                 parent: parent, now: clock())
        pools[spec.pool]!.namespaces[spec.namespace]![spec.name] = id
    }

    func children(ofImage imageID: String, snapshotID: UInt64) -> [ImageSpec] {
        func isChildLink(_ link: ParentLink?) -> Bool {
            link?.imageID == imageID && link?.snapshotID == snapshotID
        }
        return images.values
            .filter { isChildLink($0.parent) || $0.snapshots.contains { isChildLink($0.parent) } }
            .map(\.location)
            .sorted { $0.description < $1.description }
    }

    func snapshotInfo(_ snapshot: SnapshotRecord) -> SnapshotInfo {
        SnapshotInfo(id: snapshot.id, name: snapshot.name, size: snapshot.size, timestamp: snapshot.timestamp,
                     isProtected: snapshot.isProtected)
    }

    /// `rbd info` of the head (snapshot nil) or of one snapshot: its size and its parent at that time.
    func imageInfo(_ image: ImageRecord, snapshot: SnapshotRecord?, operation: String, target: String) throws
        -> ImageInfo {
        var parent: ParentInfo?
        let parentLink = snapshot == nil ? image.parent : snapshot!.parent
        if let link = parentLink {
            guard let parentImage = images[link.imageID],
                  let index = parentImage.snapshotIndex(id: link.snapshotID) else {
                throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
            }
            parent = ParentInfo(image: parentImage.location, snapshot: parentImage.snapshots[index].name,
                                overlap: link.overlap)
        }
        return ImageInfo(
            id: image.id, size: snapshot?.size ?? image.size, objectSize: image.objectSize, order: image.order,
            features: image.features, blockNamePrefix: "rbd_data.\(image.id)", createTime: image.createTime,
            modifyTime: image.modifyTime, accessTime: image.accessTime, parent: parent)
    }

    /// Queues the update handlers of the image's open handles, but the one that made the change.
    func notifyHandles(of imageID: String, except serial: UInt64?) {
        for (handleSerial, handle) in openHandles where handle.imageID == imageID && handleSerial != serial {
            pendingNotifications.append(contentsOf: handle.updateHandlers)
        }
    }

    func newGeneration() -> UInt64 {
        defer { nextGeneration += 1 }
        return nextGeneration
    }

    /// Bytes and objects stored for these images: head objects plus the copies only snapshots still hold,
    /// each at its real length, as RADOS counts them.
    func stats(ofImages imageIDs: [String]) -> StorageStats {
        var usedBytes: UInt64 = 0
        var objects: UInt64 = 0
        for id in imageIDs {
            guard let image = images[id] else { continue }
            var counted = Set<UInt64>()
            for objectSet in [image.objects] + image.snapshots.map(\.objects) {
                for object in objectSet.values where counted.insert(object.generation).inserted {
                    usedBytes += UInt64(object.bytes.count)
                    objects += 1
                }
            }
        }
        return StorageStats(totalBytes: capacity, usedBytes: usedBytes,
                            availableBytes: capacity > usedBytes ? capacity - usedBytes : 0, objects: objects)
    }
}
