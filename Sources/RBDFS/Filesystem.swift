import Foundation
import Logging
import Storage

/// How a mount behaves.
public struct FSOptions: Sendable {
    /// With `--pool P`, P's directory is the root of the mount.
    public var pool: String?
    /// Show every pool, not only those with the `rbd` application.
    public var allPools = false
    /// Refuse every change, in the daemon itself (not only through the mount flag).
    public var readOnly = false
    /// Allow truncate to cut off data (`rbd resize --allow-shrink`).
    public var allowShrink = false
    /// Allow rmdir of an empty pool (the cluster's `mon_allow_pool_delete` still applies).
    public var allowPoolDelete = false
    /// Object size of new images; nil: the cluster's default (4 MiB).
    public var objectSize: UInt64?
    /// Feature bits of new images; nil: the cluster's `rbd_default_features`.
    public var features: UInt64?
    /// A clone deeper than this many ancestors is flattened right after cloning (Cinder's
    /// `rbd_max_clone_depth`); 0 makes every clone a full copy.
    public var maxCloneDepth = 5
    /// How long listings and attributes are reused; the same bound as the kernel's entry / attr timeouts.
    public var metadataTTL: Duration = .seconds(1)
    public var uid: UInt32 = 0
    public var gid: UInt32 = 0
    /// Pools and namespaces have no times of their own in RBD; they show the mount time.
    public var mountTime = Timestamp(seconds: Int64(Date().timeIntervalSince1970))

    public init() {}
}

/// Filesystem statistics (`statfs`), in `blockSize` units.
public struct FilesystemStats: Sendable {
    public var blockSize: UInt64
    public var totalBlocks: UInt64
    public var freeBlocks: UInt64
    public var availableBlocks: UInt64
    public var files: UInt64
    public var nameMax: UInt64
}

/// What `setattr` was asked to change.
public struct AttributeChanges: Sendable {
    public var size: UInt64?
    public var mode: UInt32?
    public var uid: UInt32?
    public var gid: UInt32?
    /// atime / mtime changes: RBD keeps its own times, so these are accepted and have no effect.
    public var times = false

    public init(size: UInt64? = nil, mode: UInt32? = nil, uid: UInt32? = nil, gid: UInt32? = nil, times: Bool = false) {
        self.size = size
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.times = times
    }
}

/// The filesystem: RBD pools, namespaces, images and snapshots as a tree of directories and files.
/// Independent of FUSE: every call returns plain values or throws `FSError`, and the FUSE adapter replies.
public final class RBDFilesystem: @unchecked Sendable {
    public let store: any BlockStore
    public let options: FSOptions
    public let inodes: InodeTable
    let logger: Logger
    let cache: MetadataCache

    struct OpenFile {
        var image: OpenImage
        var writable: Bool
        /// How many failures of early-acknowledged writes this file has reported (or that came before it):
        /// each failure reaches the next fsync or close of every file open when it happened, once.
        var failuresSeen: UInt64

        init(image: OpenImage, writable: Bool) {
            self.image = image
            self.writable = writable
            failuresSeen = image.io.failures.count
        }
    }

    let lock = NSLock()
    /// Open images by the node they serve; a Glance-style upload's head image is filed under its
    /// `image@snap` node until the snapshot is taken.
    var openImages: [NodeKey: OpenImage] = [:]
    var openFiles: [UInt64: OpenFile] = [:]
    private var directoryListings: [UInt64: [DirectoryItem]] = [:]
    private var nextHandle: UInt64 = 1
    /// Where kernel invalidations go (see Coherence.swift), and the queue that handles update notifications.
    let invalidatorBox = LockedBox<(any KernelInvalidator)?>(nil)
    let coherenceQueue = DispatchQueue(label: "rbdfs.coherence")
    /// Checks the open images that have no update watch, once a ttl (started with the first of them).
    /// Guarded by `lock`.
    var unwatchedCheck: DispatchSourceTimer?

    /// Gives freed memory back to the system (FUSE sets it to malloc_trim: RBDFS imports no C). Called when
    /// the last open image closes, after the idle read buffers are freed: streaming leaves tens of MiB in
    /// malloc's per-thread arenas otherwise. At most once per `memoryReleaseInterval` (1 s: a trim costs
    /// milliseconds, and short-lived opens, a `stat` or `ln`, come in bursts); a close within it has the
    /// release run at its end instead. Set before serving.
    public var releaseIdleMemory: (@Sendable () -> Void)?
    public var memoryReleaseInterval: Duration = .seconds(1)
    /// When `releaseIdleMemory` last ran, and whether a later run is scheduled (guarded by `lock`).
    private var lastMemoryRelease = ContinuousClock.now - .seconds(3600)
    private var memoryReleaseScheduled = false

    public init(store: any BlockStore, options: FSOptions, logger: Logger) {
        self.store = store
        self.options = options
        self.logger = logger
        self.cache = MetadataCache(ttl: options.metadataTTL)
        self.inodes = InodeTable(rootKey: options.pool.map { NodeKey.pool($0) } ?? .root)
    }

    // MARK: - Names

    func key(of inode: UInt64) throws(FSError) -> NodeKey {
        guard let key = inodes.key(of: inode) else { throw .staleHandle("inode \(inode)") }
        return key
    }

    /// The node a name inside a directory stands for, checked to exist.
    func resolve(parent: NodeKey, name: String) throws(FSError) -> NodeKey {
        switch parent {
        case .root:
            guard try pools().contains(where: { $0.name == name }) else { throw .notFound(name) }
            return .pool(name)
        case .pool(let pool):
            if try namespaces(of: pool).contains(name) { return .namespace(pool: pool, name: name) }
            return try resolveFile(pool: pool, namespace: "", name: name)
        case .namespace(let pool, let namespace):
            return try resolveFile(pool: pool, namespace: namespace, name: name)
        case .image, .snapshot:
            throw .notDirectory(parent.description)
        }
    }

    private func resolveFile(pool: String, namespace: String, name: String) throws(FSError) -> NodeKey {
        let fileName: ImageFileName
        do {
            fileName = try Names.parseFileName(name)
        } catch {
            throw .invalidName(error)
        }
        let spec = ImageSpec(pool: pool, namespace: namespace, name: fileName.imageName)
        switch fileName {
        case .image:
            return .image(spec)
        case .snapshot(_, let snap):
            return .snapshot(spec, name: snap)
        }
    }

    // MARK: - Metadata

    func pools() throws(FSError) -> [PoolInfo] {
        if let cached = cache.pools() { return cached }
        let all = try FSError.wrap { try store.listPools() }
        let shown = options.allPools ? all : all.filter(\.isRBD)
        cache.store(pools: shown)
        return shown
    }

    func namespaces(of pool: String) throws(FSError) -> [String] {
        if let cached = cache.namespaces(of: pool) { return cached }
        let list = try FSError.wrap { try store.listNamespaces(pool: pool) }
        cache.store(namespaces: list, of: pool)
        return list
    }

    /// An image's info and snapshots, described afresh once the cached copy is older than the ttl (which also
    /// checks that the images rbdfs holds open under that name are still the ones the name leads to).
    func summary(of spec: ImageSpec) throws(FSError) -> ImageSummary {
        if let cached = cache.summary(spec) { return cached }
        return try refreshSummary(spec)
    }

    func attributes(of key: NodeKey, inode: UInt64) throws(FSError) -> FileAttributes {
        switch key {
        case .root, .pool, .namespace:
            return FileAttributes(
                inode: inode, kind: .directory, permissions: options.readOnly ? 0o555 : 0o755, linkCount: 2,
                size: 0, blocks: 0, blockSize: 4096, accessTime: options.mountTime, modifyTime: options.mountTime,
                changeTime: options.mountTime, uid: options.uid, gid: options.gid)
        case .image(let spec):
            let summary = try summary(of: spec)
            var size = summary.info.size
            if let open = lock.withLock({ openImages[key] }) { size = try open.currentSize() }
            return fileAttributes(inode: inode, info: summary.info, size: size, readOnly: options.readOnly,
                                  times: (summary.info.accessTime, summary.info.modifyTime), linkCount: 1,
                                  usedBytes: summary.usedBytes ?? 0)
        case .snapshot(let spec, let name):
            if let upload = lock.withLock({ openImages[key] }), upload.isUploading {
                let info = try FSError.wrap { try upload.handle.info() }
                return fileAttributes(inode: inode, info: info, size: try upload.currentSize(), readOnly: false,
                                      times: (info.accessTime, info.modifyTime), linkCount: 1,
                                      usedBytes: (try? upload.handle.usedBytes()) ?? 0)
            }
            let summary = try summary(of: spec)
            guard let snap = summary.snapshots.first(where: { $0.name == name }) else {
                throw .notFound(key.description)
            }
            // One link per clone made from it: `ls -l` shows which snapshots are in use.
            let clones = try children(of: spec, snapshot: name).count
            return fileAttributes(inode: inode, info: summary.info, size: snap.size, readOnly: true,
                                  times: (snap.timestamp, snap.timestamp), linkCount: UInt32(1 + clones),
                                  usedBytes: try snapshotUsedBytes(spec, name))
        }
    }

    private func fileAttributes(
        inode: UInt64, info: ImageInfo, size: UInt64, readOnly: Bool, times: (access: Timestamp, modify: Timestamp),
        linkCount: UInt32, usedBytes: UInt64
    ) -> FileAttributes {
        FileAttributes(
            inode: inode, kind: .regularFile, permissions: readOnly ? 0o444 : 0o644, linkCount: linkCount,
            size: size, blocks: (usedBytes + 511) / 512, blockSize: UInt32(clamping: info.objectSize), accessTime: times.access,
            modifyTime: times.modify, changeTime: max(times.modify, info.createTime), uid: options.uid, gid: options.gid)
    }

    // MARK: - Lookup and attributes

    public func lookup(parent: UInt64, name: String) throws(FSError) -> Entry {
        let parentKey = try key(of: parent)
        let key = try resolve(parent: parentKey, name: name)
        return try entry(for: key)
    }

    /// Hands a node to the kernel: its attributes, and one more lookup on its inode.
    func entry(for key: NodeKey) throws(FSError) -> Entry {
        let provisional = inodes.existingInode(of: key) ?? 0
        var attributes = try attributes(of: key, inode: provisional)
        attributes.inode = inodes.remember(key)
        return Entry(inode: attributes.inode, attributes: attributes)
    }

    public func forget(_ inode: UInt64, count: UInt64) {
        inodes.forget(inode, count: count)
    }

    public func getattr(_ inode: UInt64) throws(FSError) -> FileAttributes {
        do {
            let attributes = try attributes(of: try key(of: inode), inode: inode)
            // Describing the node may have found that its name leads to another image now (Coherence.swift).
            _ = try key(of: inode)
            return attributes
        } catch {
            // The image or snapshot this inode stood for was removed or replaced meanwhile: its files are stale.
            if inodes.key(of: inode) == nil { throw .staleHandle("inode \(inode): removed or replaced by another client") }
            throw error
        }
    }

    public func setattr(_ inode: UInt64, changes: AttributeChanges) throws(FSError) -> FileAttributes {
        let key = try key(of: inode)
        if changes.mode != nil || changes.uid != nil || changes.gid != nil {
            // Setting what is already there is fine (cp -p, mv across pools); changing it is not.
            let current = try attributes(of: key, inode: inode)
            let sameMode = changes.mode.map { UInt16($0 & 0o7777) == current.permissions } ?? true
            let sameOwner = (changes.uid ?? current.uid) == current.uid && (changes.gid ?? current.gid) == current.gid
            guard sameMode && sameOwner else {
                throw .notPermitted(key.description, reason: "RBD images have no owner or mode to change")
            }
        }
        if let size = changes.size {
            try truncate(key, to: size)
        }
        return try attributes(of: key, inode: inode)
    }

    /// Resizes an image. Growing is free (thin); a shrink that would cut off data is refused unless the
    /// mount allows it, like `rbd resize --allow-shrink`.
    func truncate(_ key: NodeKey, to size: UInt64) throws(FSError) {
        guard !key.isDirectory else { throw .isDirectory(key.description) }
        try checkMountWritable(key.description)
        try withImage(key) { (image: OpenImage) throws(FSError) in
            // A snapshot refuses, unless it is an upload still taking data (cp ends with ftruncate).
            try checkWritable(key, image: image)
            let current = try image.currentSize()
            guard size != current else { return }
            if size < current && !options.allowShrink {
                let holding = try FSError.wrap { try image.handle.allocatedExtents(in: size..<current) }
                if !holding.isEmpty {
                    throw .notPermitted(
                        key.description,
                        reason: "shrinking from \(current) to \(size) bytes would discard data; mount with -o allow_shrink to allow it")
                }
            }
            try image.resize(to: size)
            logger.info("resized \(image.spec) from \(current) to \(size) bytes")
            cache.forgetImage(image.spec)
        }
    }

    func checkMountWritable(_ path: String) throws(FSError) {
        if options.readOnly { throw .readOnly(path, reason: "the mount is read-only") }
    }

    /// Refuses changes on a read-only mount and to snapshots (but an upload to `image@snap` still in
    /// progress takes writes).
    func checkWritable(_ key: NodeKey, image: OpenImage? = nil) throws(FSError) {
        if options.readOnly { throw .readOnly(key.description, reason: "the mount is read-only") }
        if case .snapshot = key, image?.isUploading != true {
            throw .readOnly(key.description, reason: "snapshots are read-only")
        }
    }

    // MARK: - Directories

    public func openDirectory(_ inode: UInt64) throws(FSError) -> UInt64 {
        let key = try key(of: inode)
        guard key.isDirectory else { throw .notDirectory(key.description) }
        let items = try listChildren(of: key)
        return lock.withLock {
            let handle = nextHandle
            nextHandle += 1
            directoryListings[handle] = items
            return handle
        }
    }

    /// The listing taken at opendir; readdir pages through it by index.
    public func directoryItems(_ handle: UInt64) throws(FSError) -> [DirectoryItem] {
        guard let items = lock.withLock({ directoryListings[handle] }) else {
            throw .staleHandle("directory handle \(handle)")
        }
        return items
    }

    /// A listed item as a full entry (readdirplus); counts one lookup. Nil if it vanished meanwhile.
    public func entry(forListed item: DirectoryItem) -> Entry? {
        try? entry(for: item.key)
    }

    public func releaseDirectory(_ handle: UInt64) {
        _ = lock.withLock { directoryListings.removeValue(forKey: handle) }
        cache.prune()
    }

    func listChildren(of key: NodeKey) throws(FSError) -> [DirectoryItem] {
        switch key {
        case .root:
            return try pools().map { DirectoryItem(name: $0.name, key: .pool($0.name), kind: .directory) }
        case .pool(let pool):
            let namespaces = try namespaces(of: pool).map {
                DirectoryItem(name: $0, key: .namespace(pool: pool, name: $0), kind: .directory)
            }
            return namespaces + (try listImageFiles(pool: pool, namespace: ""))
        case .namespace(let pool, let namespace):
            return try listImageFiles(pool: pool, namespace: namespace)
        case .image, .snapshot:
            throw .notDirectory(key.description)
        }
    }

    /// Images and their snapshots, described in one batch so that `ls -l` needs no further round trips.
    private func listImageFiles(pool: String, namespace: String) throws(FSError) -> [DirectoryItem] {
        let names = try FSError.wrap { try store.listImages(pool: pool, namespace: namespace) }
        let shown = names.filter { name in
            if Names.isRepresentable(imageName: name) { return true }
            logger.warning("\(pool)/\(name): image name cannot be shown as a file name; hidden")
            return false
        }
        let summaries = store.describeImages(pool: pool, namespace: namespace, names: shown)
        var items: [DirectoryItem] = []
        items.reserveCapacity(shown.count)
        var snapshots: [SnapshotReference] = []
        for name in shown.sorted() {
            let spec = ImageSpec(pool: pool, namespace: namespace, name: name)
            items.append(DirectoryItem(name: name, key: .image(spec), kind: .regularFile))
            switch summaries[name] {
            case .success(let summary):
                cache.store(summary, for: spec)
                for snap in summary.snapshots where Names.isRepresentable(imageName: snap.name) {
                    items.append(DirectoryItem(name: "\(name)@\(snap.name)", key: .snapshot(spec, name: snap.name), kind: .regularFile))
                    snapshots.append(SnapshotReference(image: spec, imageID: summary.info.id, snapshot: snap))
                }
            case .failure(let error) where error.errno == .noSuchFileOrDirectory:
                items.removeLast()  // removed between the listing and the describe
            case .failure(let error):
                // Still listed: its lookup will report the error to whoever asks.
                logger.error("\(spec): listing its details failed: \(error)")
            case nil:
                break
            }
        }
        prefetchSnapshotDetails(snapshots)
        return items
    }

    /// Finds the link count (1 + clones) and used bytes of a listing's snapshot files, all in one call of the
    /// store, into the metadata cache. The Ceph store reads them from metadata objects; opening each snapshot
    /// instead cost milliseconds of librbd CPU and round trips each (a pool of 600 Glance images, each with its
    /// snapshot, listed in 3.5 s against 1.4 s for `rbd ls -l`), and one after another, as readdirplus asks,
    /// far more. A failure is left for the file's own lookup to report.
    private func prefetchSnapshotDetails(_ snapshots: [SnapshotReference]) {
        let missing = snapshots.filter { reference in
            let key = NodeKey.snapshot(reference.image, name: reference.snapshot.name)
            return cache.children(of: key) == nil || cache.usedBytes(of: key) == nil
        }
        guard !missing.isEmpty else { return }
        // Stored together, once all are found: stamped as each was found, the first of a large pool's would
        // expire before readdirplus reaches them and be found again one by one.
        for (reference, result) in store.describeSnapshots(missing) {
            guard case .success(let details) = result else { continue }
            let key = NodeKey.snapshot(reference.image, name: reference.snapshot.name)
            cache.store(children: details.children, of: key)
            cache.store(usedBytes: details.usedBytes, of: key)
        }
    }

    // MARK: - Files

    /// Opens a file; the image (or snapshot) handle is shared by every open file of it.
    public func open(_ inode: UInt64, flags: Int32) throws(FSError) -> UInt64 {
        let key = try key(of: inode)
        guard !key.isDirectory else { throw .isDirectory(key.description) }
        let writable = (flags & O_ACCMODE) != O_RDONLY
        let image = try acquireImage(key)
        if inodes.key(of: inode) == nil {
            // Its name was found to lead to another image meanwhile: ESTALE makes the kernel look it up again.
            releaseImage(image)
            throw .staleHandle("\(key): replaced by another client")
        }
        if writable {
            do {
                try checkWritable(key, image: image)
            } catch {
                releaseImage(image)
                throw error
            }
        }
        if writable && (flags & O_TRUNC) != 0 && !image.isUploading {
            do {
                try truncate(key, to: 0)
            } catch {
                releaseImage(image)
                throw error
            }
        }
        return register(OpenFile(image: image, writable: writable))
    }

    func register(_ file: OpenFile) -> UInt64 {
        lock.withLock {
            let handle = nextHandle
            nextHandle += 1
            openFiles[handle] = file
            return handle
        }
    }

    /// An open file. One whose image another client removed or replaced is ESTALE, unless `evenIfReplaced`
    /// (fsync and close still flush what was written to it).
    func openFile(_ handle: UInt64, evenIfReplaced: Bool = false) throws(FSError) -> OpenFile {
        guard let file = lock.withLock({ openFiles[handle] }) else { throw .staleHandle("file handle \(handle)") }
        if file.image.isReplaced && !evenIfReplaced {
            throw .staleHandle("\(file.image.path): the image open in this file was removed, renamed or replaced by another client")
        }
        return file
    }

    public func read(_ handle: UInt64, offset: UInt64, size: Int,
                     reply: @escaping @Sendable (Result<UnsafeRawBufferPointer, FSError>) -> Void) {
        let file: OpenFile
        do {
            file = try openFile(handle)
        } catch {
            return reply(.failure(error))
        }
        IOEngine.read(file.image, offset: offset, size: size, reply: reply)
    }

    /// Writes file data. `writeThrough` (O_SYNC, O_DSYNC, a `--sync` mount) replies once the OSDs have the data;
    /// otherwise the reply goes once librbd has it, and a later failure is logged and reported by the next
    /// fsync or close of every file open on the image (and cancels a pending upload's snapshot).
    public func write(_ handle: UInt64, offset: UInt64, data: UnsafeRawBufferPointer, writeThrough: Bool = true,
                      reply: @escaping @Sendable (Result<Int, FSError>) -> Void) {
        let file: OpenFile
        do throws(FSError) {
            file = try openFile(handle)
            guard file.writable else { throw FSError.invalidArgument(file.image.path, reason: "file not open for writing") }
            if file.image.isSealed { throw FSError.readOnly(file.image.path, reason: "the upload is complete and its snapshot taken") }
        } catch {
            return reply(.failure(error))
        }
        let image = file.image
        let logger = self.logger, count = data.count
        IOEngine.write(image, offset: offset, data: data, acknowledgeEarly: !writeThrough, lateFailure: { error in
            logger.error("\(image.path): write of \(count) bytes at \(offset) failed after it was acknowledged (reported at the next fsync or close): \(error)")
            image.recordWriteFailure(error)
            image.io.recordFailure(error)
        }) { result in
            if case .failure(let error) = result { image.recordWriteFailure(error) }
            reply(result)
        }
        cache.forget(file.image.spec)
    }

    /// close(2) of a file: writers' data is made durable and any growth step trimmed; errors reach close.
    /// close(2) of the last writer of a Glance-style upload also takes and protects its snapshot.
    public func flush(_ handle: UInt64, reply: @escaping @Sendable (Result<Void, FSError>) -> Void) {
        guard let file = lock.withLock({ openFiles[handle] }), file.writable,
              file.image.pendingUpload() != nil, lock.withLock({ file.image.openCount == 1 })
        else {
            return fsync(handle, reply: reply)
        }
        reply(Result(catching: { () throws(FSError) in try finishUpload(file.image) }))
    }

    public func fsync(_ handle: UInt64, reply: @escaping @Sendable (Result<Void, FSError>) -> Void) {
        let file: OpenFile
        do {
            file = try openFile(handle, evenIfReplaced: true)
        } catch {
            return reply(.failure(error))
        }
        guard file.writable else { return reply(.success(())) }
        IOEngine.flush(file.image) { result in
            reply(result.flatMap { self.takeLateFailure(handle) })
        }
    }

    /// The failure of an early-acknowledged write this file has not reported yet, if any (then marked reported).
    func takeLateFailure(_ handle: UInt64) -> Result<Void, FSError> {
        lock.withLock {
            guard var file = openFiles[handle] else { return .success(()) }
            let (count, last) = file.image.io.failures
            guard count > file.failuresSeen, let last else { return .success(()) }
            file.failuresSeen = count
            openFiles[handle] = file
            return .failure(last)
        }
    }

    /// fallocate(2): PUNCH_HOLE (with KEEP_SIZE) and ZERO_RANGE make the range read as zeros and release
    /// whole objects; mode 0 grows the image when the range passes its end (space is thin: nothing else to
    /// do). Anything else is EOPNOTSUPP.
    public func fallocate(_ handle: UInt64, mode: Int32, offset: UInt64, length: UInt64,
                          reply: @escaping @Sendable (Result<Void, FSError>) -> Void) {
        let keepSize: Int32 = 0x01, punchHole: Int32 = 0x02, zeroRange: Int32 = 0x10
        let image: OpenImage, end: UInt64
        do throws(FSError) {
            let file = try openFile(handle)
            image = file.image
            if file.image.isSealed || (file.image.key.isSnapshot && !file.image.isUploading) {
                throw FSError.readOnly(image.path, reason: "snapshots are read-only")
            }
            guard file.writable else { throw FSError.invalidArgument(image.path, reason: "file not open for writing") }
            guard mode & ~(keepSize | punchHole | zeroRange) == 0, mode & (punchHole | zeroRange) != (punchHole | zeroRange) else {
                throw FSError.notSupported(image.path, reason: "fallocate mode \(mode)")
            }
            end = offset + length
            if mode & keepSize == 0, end > (try image.currentSize()) {
                try image.prepareWrite(ending: end)
            }
        } catch {
            return reply(.failure(error))
        }
        guard mode & (punchHole | zeroRange) != 0 else { return reply(.success(())) }
        let size: UInt64
        do {
            size = try image.currentSize()
        } catch {
            return reply(.failure(error))
        }
        let clampedEnd = min(end, size)
        guard offset < clampedEnd else { return reply(.success(())) }
        IOEngine.zero(image, offset: offset, length: clampedEnd - offset, reply: reply)
        cache.forgetImage(image.spec)
    }

    /// lseek SEEK_DATA / SEEK_HOLE from the image's allocation (rbd_diff_iterate2, fast-diff when valid),
    /// whole objects, including a parent's data. ENXIO past the end, and for SEEK_DATA past the last data.
    public func seek(_ handle: UInt64, offset: UInt64, whence: Int32) throws(FSError) -> UInt64 {
        let image = try openFile(handle).image
        let size = try image.currentSize()
        // SEEK_DATA and SEEK_HOLE (Linux values; Glibc hides them behind _GNU_SOURCE).
        let seekData: Int32 = 3, seekHole: Int32 = 4
        guard whence == seekData || whence == seekHole else {
            throw .invalidArgument(image.path, reason: "lseek whence \(whence)")
        }
        guard offset < size else { throw .noDataPastOffset(image.path, offset: offset) }
        let extents = try image.dataExtents()
        if whence == seekData {
            guard let extent = extents.first(where: { $0.upperBound > offset }) else {
                throw .noDataPastOffset(image.path, offset: offset)
            }
            return max(offset, extent.lowerBound)
        }
        if let extent = extents.first(where: { $0.contains(offset) }) { return min(extent.upperBound, size) }
        return offset
    }

    public func release(_ handle: UInt64) {
        guard let file = lock.withLock({ openFiles.removeValue(forKey: handle) }) else { return }
        releaseImage(file.image)
    }

    public func statfs(_ inode: UInt64) throws(FSError) -> FilesystemStats {
        let key = (try? key(of: inode)) ?? .root
        let pool: String?
        switch key {
        case .root: pool = nil
        case .pool(let name), .namespace(let name, _): pool = name
        case .image(let spec), .snapshot(let spec, _): pool = spec.pool
        }
        // Anything inside a pool reports that pool's use; the root of all pools, the cluster's.
        let stats = try FSError.wrap { try pool.map { try store.poolStats(pool: $0) } ?? store.clusterStats() }
        let block: UInt64 = 4096
        return FilesystemStats(
            blockSize: block, totalBlocks: stats.totalBytes / block,
            freeBlocks: stats.availableBytes / block, availableBlocks: stats.availableBytes / block,
            files: stats.objects, nameMax: 255)
    }

    /// Bytes a snapshot holds (its objects as of the snapshot, not a parent's), cached as listings are.
    func snapshotUsedBytes(_ spec: ImageSpec, _ name: String) throws(FSError) -> UInt64 {
        let key = NodeKey.snapshot(spec, name: name)
        if let cached = cache.usedBytes(of: key) { return cached }
        let used = try withImage(key) { (image: OpenImage) throws(FSError) in
            try FSError.wrap { try image.handle.usedBytes() }
        }
        cache.store(usedBytes: used, of: key)
        return used
    }

    // MARK: - Image handles

    /// The shared open image for a node, opened on first use.
    func acquireImage(_ key: NodeKey) throws(FSError) -> OpenImage {
        // A handle kept open across a change by another client may hold an image that no longer has this name.
        if let shared = lock.withLock({ openImages[key] }) { verifyIdentity(shared) }
        if let image = lock.withLock({ () -> OpenImage? in
            let image = openImages[key]
            image?.openCount += 1
            return image
        }) {
            return image
        }
        let spec: ImageSpec, snapshot: String?
        switch key {
        case .image(let s): (spec, snapshot) = (s, nil)
        case .snapshot(let s, let name): (spec, snapshot) = (s, name)
        default: throw .isDirectory(key.description)
        }
        let fresh = try openImage(key: key, spec: spec, snapshot: snapshot, readOnly: snapshot != nil || options.readOnly)
        let (image, loser) = lock.withLock { () -> (OpenImage, OpenImage?) in
            // Another thread may have opened it meanwhile: use theirs, close ours.
            if let existing = openImages[key] {
                existing.openCount += 1
                return (existing, fresh)
            }
            fresh.openCount = 1
            openImages[key] = fresh
            return (fresh, nil)
        }
        loser?.handle.close()
        return image
    }

    /// Opens a librbd handle for a node (not yet shared: the caller files it).
    func openImage(key: NodeKey, spec: ImageSpec, snapshot: String?, readOnly: Bool, uploadSnapshot: String? = nil)
        throws(FSError) -> OpenImage
    {
        let handle = try FSError.wrap { try store.openImage(spec, snapshot: snapshot, readOnly: readOnly) }
        do {
            let info = try FSError.wrap { try handle.info() }
            let snapshotID = try snapshot.map { (name: String) throws(FSError) -> UInt64 in
                let snapshots = try FSError.wrap { try handle.snapshots() }
                guard let found = snapshots.first(where: { $0.name == name }) else { throw .notFound(key.description) }
                return found.id
            }
            let image = OpenImage(key: key, spec: spec, handle: handle, objectSize: info.objectSize, imageID: info.id,
                                  snapshotID: snapshotID, uploadSnapshot: uploadSnapshot)
            watchForChanges(image)
            return image
        } catch {
            handle.close()
            throw error
        }
    }

    /// Drops one user of an open image; the last one trims growth and closes the handle (which flushes).
    func releaseImage(_ image: OpenImage) {
        let last = lock.withLock { () -> Bool in
            image.openCount -= 1
            guard image.openCount == 0 else { return false }
            if openImages[image.key] === image { openImages[image.key] = nil }
            return true
        }
        guard last else { return }
        if image.pendingUpload() != nil {
            // The last writer went without a flush reaching us (several descriptors): finish here.
            do {
                try finishUpload(image)
            } catch {
                logger.error("\(image.path): upload not completed: \(error)")
            }
        }
        do {
            try image.trimGrowth()
        } catch {
            logger.error("\(image.path): trimming the growth step on close failed: \(error)")
        }
        image.handle.close()
        cache.forget(image.spec)
        releaseMemoryIfIdle()
    }

    /// Frees idle memory once no image is open. A close soon after the last release schedules one for
    /// when the interval has passed: skipped instead, the release for a stream that ends just after a
    /// `stat` (whose temporary open counts) would wait for the next close, and the daemon keep ~60 MiB.
    private func releaseMemoryIfIdle() {
        let wait = lock.withLock { () -> Duration? in
            guard openImages.isEmpty, !memoryReleaseScheduled else { return nil }
            let since = ContinuousClock.now - lastMemoryRelease
            if since >= memoryReleaseInterval {
                lastMemoryRelease = ContinuousClock.now
                return .zero
            }
            memoryReleaseScheduled = true
            return memoryReleaseInterval - since
        }
        guard let wait else { return }
        if wait > .zero {
            DispatchQueue.global().asyncAfter(deadline: .now() + wait.dispatchInterval) { [weak self] in
                guard let self else { return }
                lock.withLock { self.memoryReleaseScheduled = false }
                releaseMemoryIfIdle()
            }
            return
        }
        ReadBuffers.shared.releaseIdle()
        releaseIdleMemory?()
    }

    /// Runs `body` with the node's open image, opening a temporary one if no file has it open.
    func withImage<T>(_ key: NodeKey, _ body: (OpenImage) throws(FSError) -> T) throws(FSError) -> T {
        let image = try acquireImage(key)
        defer { releaseImage(image) }
        return try body(image)
    }

    /// Makes everything written through open files durable, keeping them open: the first thing SIGTERM does,
    /// before the mount goes away under writers that may never close.
    public func flushOpenImages() {
        for image in lock.withLock({ Array(openImages.values) }) { flushForUnmount(image) }
    }

    /// Makes everything written durable and closes every image: unmount and SIGTERM.
    public func shutdown() {
        let images = lock.withLock { () -> [OpenImage] in
            let all = Array(openImages.values)
            openImages.removeAll()
            openFiles.removeAll()
            return all
        }
        for image in images {
            flushForUnmount(image)
            image.handle.close()
        }
    }

    private func flushForUnmount(_ image: OpenImage) {
        do {
            try image.trimGrowth()
            try flushNow(image)
        } catch {
            logger.error("\(image.path): flush at unmount failed: \(error)")
        }
    }
}

extension Duration {
    /// The same span for Dispatch's timers (whole nanoseconds).
    var dispatchInterval: DispatchTimeInterval {
        .nanoseconds(Int(clamping: components.seconds * 1_000_000_000 + components.attoseconds / 1_000_000_000))
    }
}
