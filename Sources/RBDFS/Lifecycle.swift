import Foundation
import Storage

// Creating, removing, renaming and linking — the OpenStack conventions as file gestures:
//
//   cp f  pool/name            a new image (format 2, thin)
//   cp f  pool/name@snap       Glance upload: image `name`, and at the last close snapshot `snap`, protected
//   ln    pool/img pool/img@s  snapshot + protect (Cinder create_snapshot)
//   ln    pool/img@s q/new     clone (Nova "clone, don't download", Cinder volume from snapshot)
//   ln    pool/vol q/new       Cinder create_cloned_volume: snapshot `new.clone_snap`, protect, clone
//   rm    pool/img[@s], mv, mkdir, rmdir
extension RBDFilesystem {
    // MARK: - Create

    /// Creates a file: a new image, or (for `name@snap`) the start of a Glance-style upload. Returns the
    /// entry (one lookup) and an open file handle.
    public func create(parent: UInt64, name: String, flags: Int32) throws(FSError) -> (Entry, UInt64) {
        let key = try resolve(parent: try key(of: parent), name: name)
        try checkMountWritable(key.description)
        switch key {
        case .image(let spec):
            let created: Bool
            if try exists(key) {
                // The kernel's view was stale: the image appeared meanwhile (made by another client).
                if flags & O_EXCL != 0 { throw .exists(key.description) }
                created = false
            } else {
                try createImage(spec)
                created = true
            }
            let entry = try entry(for: key)
            do {
                let handle = try open(entry.inode, flags: created ? flags & ~O_TRUNC : flags)
                if created { try openFile(handle).image.trackAllocationFromEmpty() }
                return (entry, handle)
            } catch {
                forget(entry.inode, count: 1)
                throw error
            }
        case .snapshot(let spec, let snap):
            // glance_store's add(): the image must be new; it takes the data, then `snap` is taken and protected.
            if try exists(.image(spec)) {
                throw .exists("\(spec) (an upload to \(spec.name)@\(snap) needs a new image)")
            }
            try createImage(spec)
            let image: OpenImage
            do {
                image = try openUpload(spec, snapshot: snap)
            } catch {
                try? FSError.wrap { try store.removeImage(spec) }
                throw error
            }
            let handle = register(OpenFile(image: image, writable: true))
            logger.info("upload started: \(spec), snapshot \(snap) at the last close")
            return (try entry(for: key), handle)
        case .root, .pool, .namespace:
            throw .isDirectory(key.description)
        }
    }

    /// mknod of a regular file (touch with no create op, or mknod(2)): an empty image.
    public func makeFile(parent: UInt64, name: String) throws(FSError) -> Entry {
        let key = try resolve(parent: try key(of: parent), name: name)
        try checkMountWritable(key.description)
        guard case .image(let spec) = key else {
            throw .invalidArgument(key.description, reason: "only images can be created empty; a snapshot needs data or ln")
        }
        if try exists(key) { throw .exists(key.description) }
        try createImage(spec)
        return try entry(for: key)
    }

    private func createImage(_ spec: ImageSpec) throws(FSError) {
        try FSError.wrap {
            try store.createImage(spec, size: 0, options: ImageCreateOptions(objectSize: options.objectSize, features: options.features))
        }
        cache.forgetImage(spec)
        logger.info("created image \(spec)")
    }

    /// Opens the head of a new image for an upload, filed under its `image@snap` node.
    private func openUpload(_ spec: ImageSpec, snapshot: String) throws(FSError) -> OpenImage {
        let key = NodeKey.snapshot(spec, name: snapshot)
        let image = try openImage(key: key, spec: spec, snapshot: nil, readOnly: false, uploadSnapshot: snapshot)
        image.openCount = 1
        image.trackAllocationFromEmpty()
        let clash = lock.withLock { () -> Bool in
            if openImages[key] != nil { return true }
            openImages[key] = image
            return false
        }
        if clash {
            image.handle.close()
            throw .busy(key.description, reason: "another upload to this name is in progress")
        }
        return image
    }

    /// The end of an upload: trim, flush, then take and protect the snapshot. A write that failed, or a
    /// failed flush, cancels the snapshot and fails the close with that error.
    func finishUpload(_ image: OpenImage) throws(FSError) {
        image.io.waitForEarlier()  // a write still in flight may yet fail and cancel the snapshot
        guard let (snapshot, failure) = image.pendingUpload() else { return }
        if let failure {
            logger.error("upload of \(image.spec): a write failed, so no snapshot \(snapshot) is made: \(failure)")
            throw failure
        }
        try image.trimGrowth()
        try flushNow(image)
        try FSError.wrap {
            try image.handle.createSnapshot(snapshot)
            try image.handle.protectSnapshot(snapshot)
        }
        image.seal()
        cache.forgetImage(image.spec)
        invalidateAttributes(of: image.key)  // the file is the read-only snapshot now (0444)
        logger.info("upload complete: \(image.spec)@\(snapshot) taken and protected")
    }

    /// Flushes an image and waits for it (on a worker thread, never from a completion).
    func flushNow(_ image: OpenImage) throws(FSError) {
        image.io.waitForEarlier()
        let done = DispatchSemaphore(value: 0)
        let outcome = LockedBox<Result<Void, StorageError>>(.success(()))
        image.handle.flush { result in
            outcome.value = result
            done.signal()
        }
        done.wait()
        try FSError.wrap { try outcome.value.get() }
    }

    // MARK: - Remove

    /// rm: `image` → rbd_remove; `image@snap` → unprotect + rbd_snap_remove, refused while clones use it.
    public func unlink(parent: UInt64, name: String) throws(FSError) {
        let key = try resolve(parent: try key(of: parent), name: name)
        try checkMountWritable(key.description)
        switch key {
        case .image(let spec):
            // rbdfs's own handle is a watcher and would make librbd answer EBUSY: let recent closes finish.
            try waitUntilClosed(key)
            let parent = try? summary(of: spec).info.parent
            try FSError.wrap { try store.removeImage(spec) }
            cache.forgetImage(spec)
            if let parent {
                // Its snapshot has one clone less (st_nlink).
                cache.forgetImage(parent.image)
                invalidateAttributes(of: .snapshot(parent.image, name: parent.snapshot))
            }
            logger.info("removed image \(spec)")
        case .snapshot(let spec, let snap):
            // Asked afresh, not from the listing cache: a clone made a moment ago must keep its parent.
            let clones = try FSError.wrap { try store.children(of: spec, snapshot: snap) }
            if !clones.isEmpty {
                throw .busy(key.description, reason: "in use by \(clones.count) clone(s): \(clones.map(\.description).joined(separator: ", "))")
            }
            try withImage(.image(spec)) { (image: OpenImage) throws(FSError) in
                let snapshots = try FSError.wrap { try image.handle.snapshots() }
                guard let info = snapshots.first(where: { $0.name == snap }) else { throw .notFound(key.description) }
                try FSError.wrap {
                    if info.isProtected { try image.handle.unprotectSnapshot(snap) }
                    try image.handle.removeSnapshot(snap)
                }
            }
            cache.forgetImage(spec)
            invalidateAttributes(of: .image(spec))
            logger.info("removed snapshot \(spec)@\(snap)")
        case .root, .pool, .namespace:
            throw .isDirectory(key.description)
        }
    }

    /// Waits up to two seconds for the files of a node to be released: the kernel sends `release`
    /// after close(2) returns, so an `rm` right after a `cat` would otherwise find the image still open.
    private func waitUntilClosed(_ key: NodeKey) throws(FSError) {
        for _ in 0..<40 {
            if lock.withLock({ openImages[key] == nil }) { return }
            usleep(50_000)
        }
        throw .busy(key.description, reason: "open in this mount")
    }

    // MARK: - Rename

    /// mv within one pool and namespace: rbd_rename; `img@s` → `img@t` renames a snapshot. Never replaces.
    public func rename(parent: UInt64, name: String, newParent: UInt64, newName: String) throws(FSError) {
        let source = try resolve(parent: try key(of: parent), name: name)
        let target = try resolve(parent: try key(of: newParent), name: newName)
        try checkMountWritable(source.description)
        switch (source, target) {
        case (.image(let from), .image(let to)):
            guard from.pool == to.pool, from.namespace == to.namespace else { throw .crossDevice(source.description) }
            if try exists(target) { throw .exists(target.description) }
            try waitUntilClosed(source)
            try FSError.wrap { try store.renameImage(from, to: to.name) }
            cache.forgetImage(from)
            cache.forgetImage(to)
        case (.snapshot(let image, let from), .snapshot(let sameImage, let to)) where image == sameImage:
            if try exists(target) { throw .exists(target.description) }
            try withImage(.image(image)) { (open: OpenImage) throws(FSError) in
                try FSError.wrap { try open.handle.renameSnapshot(from, to: to) }
            }
            cache.forgetImage(image)
            invalidateAttributes(of: .image(image))
        case (.image, .snapshot), (.snapshot, .image), (.snapshot, .snapshot):
            throw .invalidArgument(source.description, reason: "an image and a snapshot cannot be renamed into each other; use ln to snapshot or clone")
        case (.root, _), (.pool, _), (.namespace, _), (_, .root), (_, .pool), (_, .namespace):
            throw .notPermitted(source.description, reason: "pools and namespaces cannot be renamed through the mount")
        }
        inodes.rename(source, to: target)
        logger.info("renamed \(source) to \(target)")
    }

    // MARK: - Link: snapshot and clone

    /// ln: snapshot (`img` → `img@s`), clone (`img@s` → `new`) or Cinder volume clone (`vol` → `new`).
    public func link(_ inode: UInt64, newParent: UInt64, newName: String) throws(FSError) -> Entry {
        let source = try key(of: inode)
        let target = try resolve(parent: try key(of: newParent), name: newName)
        try checkMountWritable(target.description)
        if try exists(target) { throw .exists(target.description) }
        switch (source, target) {
        case (.image(let spec), .snapshot(let sameSpec, let snap)) where spec == sameSpec:
            try snapshotAndProtect(spec, snap)
        case (.snapshot(let parent, let snap), .image(let child)):
            try clone(parent, snap, as: child)
        case (.image(let volume), .image(let child)):
            // Cinder's create_cloned_volume: a snapshot named after the new volume, then a clone of it.
            let snap = "\(child.name).clone_snap"
            guard snap.utf8.count <= Names.maxImageNameBytes else {
                throw .invalidName(.tooLong(snap, limit: Names.maxImageNameBytes))
            }
            try snapshotAndProtect(volume, snap)
            try clone(volume, snap, as: child)
        case (.image, .snapshot):
            throw .invalidArgument(target.description, reason: "a snapshot must carry its own image's name (ln pool/img pool/img@snap)")
        case (.snapshot, .snapshot):
            throw .invalidArgument(target.description, reason: "a snapshot cannot be linked as another snapshot")
        case (.root, _), (.pool, _), (.namespace, _), (_, .root), (_, .pool), (_, .namespace):
            throw .notPermitted(source.description, reason: "directories cannot be linked")
        }
        return try entry(for: target)
    }

    /// Flushes open writers of the image, then takes and protects the snapshot.
    private func snapshotAndProtect(_ spec: ImageSpec, _ snap: String) throws(FSError) {
        try withImage(.image(spec)) { (image: OpenImage) throws(FSError) in
            try image.trimGrowth()
            try flushNow(image)
            try FSError.wrap {
                try image.handle.createSnapshot(snap)
                try image.handle.protectSnapshot(snap)
            }
        }
        cache.forgetImage(spec)
        invalidateAttributes(of: .image(spec))
        logger.info("snapshot \(spec)@\(snap) taken and protected")
    }

    /// Clones `parent@snap` as `child` (protecting the snapshot first if needed), then flattens the child when
    /// its chain of ancestors passes the clone-depth limit.
    private func clone(_ parent: ImageSpec, _ snap: String, as child: ImageSpec) throws(FSError) {
        let summary = try summary(of: parent)
        guard let snapshot = summary.snapshots.first(where: { $0.name == snap }) else {
            throw .notFound(parent.describing(snapshot: snap))
        }
        if !snapshot.isProtected {
            try withImage(.image(parent)) { (image: OpenImage) throws(FSError) in
                try FSError.wrap { try image.handle.protectSnapshot(snap) }
            }
        }
        try FSError.wrap {
            try store.cloneImage(parent: parent, snapshot: snap, child: child, options: ImageCreateOptions(features: options.features))
        }
        cache.forgetImage(parent)
        cache.forgetImage(child)
        // The kernel would show the snapshot's old link count (1 + clones) until its attributes time out.
        invalidateAttributes(of: .snapshot(parent, name: snap))
        let depth = try cloneDepth(of: child)
        logger.info("cloned \(parent)@\(snap) as \(child) (clone depth \(depth))")
        if depth > options.maxCloneDepth {
            logger.info("\(child): clone depth \(depth) exceeds \(options.maxCloneDepth); flattening")
            try flatten(child)
        }
    }

    /// Copies a clone's parent data in and detaches it.
    func flatten(_ spec: ImageSpec) throws(FSError) {
        let parent = try? summary(of: spec).info.parent
        try withImage(.image(spec)) { (image: OpenImage) throws(FSError) in
            try FSError.wrap { try image.handle.flatten(progress: nil) }
        }
        cache.forgetImage(spec)
        if let parent {
            // Its snapshot has one clone less (st_nlink).
            cache.forgetImage(parent.image)
            invalidateAttributes(of: .snapshot(parent.image, name: parent.snapshot))
        }
        logger.info("flattened \(spec)")
    }

    /// How many ancestors an image has (0 for an image that is not a clone).
    func cloneDepth(of spec: ImageSpec) throws(FSError) -> Int {
        var depth = 0
        var current = spec
        while let parent = try summary(of: current).info.parent {
            depth += 1
            current = parent.image
            guard depth < 1000 else { break }  // a loop cannot happen in RBD; never spin if it did
        }
        return depth
    }

    /// Clones of one snapshot, cached as long as listings are.
    func children(of spec: ImageSpec, snapshot: String) throws(FSError) -> [ImageSpec] {
        let key = NodeKey.snapshot(spec, name: snapshot)
        if let cached = cache.children(of: key) { return cached }
        let children = try FSError.wrap { try store.children(of: spec, snapshot: snapshot) }
        cache.store(children: children, of: key)
        return children
    }

    // MARK: - Directories

    /// mkdir: a pool (at the root of all pools, initialised for RBD) or a namespace (in a pool).
    public func makeDirectory(parent: UInt64, name: String) throws(FSError) -> Entry {
        let parentKey = try key(of: parent)
        do {
            try Names.checkDirectoryName(name)
        } catch {
            throw .invalidName(error)
        }
        try checkMountWritable(name)
        let key: NodeKey
        switch parentKey {
        case .root:
            key = .pool(name)
            if try pools().contains(where: { $0.name == name }) { throw .exists(name) }
            try FSError.wrap { try store.createPool(name) }
            cache.forgetPools()
        case .pool(let pool):
            key = .namespace(pool: pool, name: name)
            let namespaceExists = try namespaces(of: pool).contains(name)
            let imageExists = try exists(.image(ImageSpec(pool: pool, name: name)))
            if namespaceExists || imageExists { throw .exists(key.description) }
            try FSError.wrap { try store.createNamespace(pool: pool, name: name) }
            cache.forgetNamespaces(of: pool)
        case .namespace:
            throw .notPermitted(parentKey.description, reason: "RBD namespaces do not nest")
        case .image, .snapshot:
            throw .notDirectory(parentKey.description)
        }
        logger.info("created \(key)")
        return try entry(for: key)
    }

    /// rmdir: an empty namespace; an empty pool only with allow_pool_delete.
    public func removeDirectory(parent: UInt64, name: String) throws(FSError) {
        let key = try resolve(parent: try key(of: parent), name: name)
        try checkMountWritable(key.description)
        switch key {
        case .pool(let pool):
            guard options.allowPoolDelete else {
                throw .notPermitted(pool, reason: "deleting pools needs the allow_pool_delete mount option")
            }
            let images = try FSError.wrap { try store.listImages(pool: pool, namespace: "") }
            let namespaces = try namespaces(of: pool)
            if !images.isEmpty || !namespaces.isEmpty {
                throw .notEmpty(pool, reason: "\(images.count) image(s), \(namespaces.count) namespace(s)")
            }
            try FSError.wrap { try store.deletePool(pool) }
            cache.forgetPools()
        case .namespace(let pool, let namespace):
            let images = try FSError.wrap { try store.listImages(pool: pool, namespace: namespace) }
            if !images.isEmpty { throw .notEmpty(key.description, reason: "\(images.count) image(s)") }
            try FSError.wrap { try store.removeNamespace(pool: pool, name: namespace) }
            cache.forgetNamespaces(of: pool)
        case .image, .snapshot:
            throw .notDirectory(key.description)
        case .root:
            throw .busy("/", reason: "the mount's root")
        }
        logger.info("removed \(key)")
    }

    /// True when the node exists now (ENOENT is false; any other failure is thrown).
    func exists(_ key: NodeKey) throws(FSError) -> Bool {
        do {
            _ = try attributes(of: key, inode: 0)
            return true
        } catch {
            if error.errno == .noSuchFileOrDirectory { return false }
            throw error
        }
    }
}

/// A value written from one thread and read from another after a semaphore.
final class LockedBox<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value

    init(_ value: Value) { stored = value }

    var value: Value {
        get { lock.withLock { stored } }
        set { lock.withLock { stored = newValue } }
    }

    /// Changes the value in place, under the lock.
    func withValue<T>(_ body: (inout Value) -> T) -> T { lock.withLock { body(&stored) } }
}
