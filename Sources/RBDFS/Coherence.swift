import Foundation
import Storage

// Coherence with other clients (the rbd CLI, OpenStack services, another rbdfs).
//
// Every image head rbdfs holds open has a librbd update watch. When another client changes the image's
// header (resize, snapshot create / remove / rename, rollback, a clone made from one of its snapshots), the
// watch fires on a librbd thread. That thread only forgets the image's cached metadata and hands the rest to
// one serial queue of our own, which queues the kernel invalidations (the image's attributes and pages, its
// snapshot files' attributes and names) and checks that the name still leads to the same image. The kernel
// is told through a `KernelInvalidator`, which only queues: the FUSE adapter calls the kernel from a thread
// of its own, never from a FUSE worker or a librbd callback.
//
// What no watch covers (images created or removed in a pool by another client: librbd has no watch on a
// pool's directory; snapshots, which rbdfs opens read-only and which have no header watch) is left to the
// short entry / attribute timeouts and the metadata cache's equal lifetime.

/// What the filesystem asks the kernel to forget. Implementations only queue the request and return at
/// once, so the calls are safe from any thread: a FUSE worker, a librbd callback, with or without locks.
public protocol KernelInvalidator: AnyObject, Sendable {
    /// Forget the attributes of `inode` (and, with `data`, its cached pages).
    func invalidateInode(_ inode: UInt64, data: Bool)
    /// Forget the name `name` in the directory `parent` (the next use looks it up again).
    func invalidateEntry(parent: UInt64, name: String)
}

extension RBDFilesystem {
    /// Where kernel invalidations go; nil (the default, and in tests without a fake) drops them.
    public var invalidator: (any KernelInvalidator)? {
        get { invalidatorBox.value }
        set { invalidatorBox.value = newValue }
    }

    /// Waits until the update notifications received so far are handled (for tests).
    public func waitForCoherenceWork() {
        coherenceQueue.sync {}
    }

    /// Registers the update watch of a freshly opened image. A watch that cannot be registered is not an
    /// error: the entry and attribute timeouts still bound how stale the mount can be.
    ///
    /// librbd gives a read-only handle (every snapshot; the heads of a `--read-only` mount) no header watch,
    /// so no notification ever comes for it: those images are checked once a ttl instead, so that one
    /// removed or replaced meanwhile (`rbd rm` succeeds then, and its data reads as zeros) answers ESTALE
    /// within about a ttl even if nothing else looks at its name.
    func watchForChanges(_ image: OpenImage) {
        if image.handle.isReadOnly { startUnwatchedCheck() }
        do {
            try image.handle.watchUpdates { [weak self, weak image] in
                // A librbd thread: never call librbd or FUSE from here, only forget and hand over.
                guard let self, let image else { return }
                self.cache.forgetImage(image.spec)
                self.coherenceQueue.async { self.imageChangedElsewhere(image) }
            }
        } catch {
            logger.warning("\(image.path): no update watch (\(error)); changes by other clients show up within \(options.metadataTTL)")
        }
    }

    private func startUnwatchedCheck() {
        lock.withLock {
            guard unwatchedCheck == nil else { return }
            let period = max(options.metadataTTL, .milliseconds(250))
            let interval = period.dispatchInterval
            let timer = DispatchSource.makeTimerSource(queue: coherenceQueue)
            timer.schedule(deadline: .now() + interval, repeating: interval, leeway: .milliseconds(50))
            timer.setEventHandler { [weak self] in
                guard let self else { return timer.cancel() }  // which releases this handler, and the timer
                self.checkUnwatchedImages()
            }
            timer.resume()
            unwatchedCheck = timer
        }
    }

    /// On the coherence queue: verifies every open image that has no update watch.
    private func checkUnwatchedImages() {
        let unwatched = lock.withLock { openImages.values.filter { $0.handle.isReadOnly } }
        for image in unwatched { verifyIdentity(image) }
    }

    /// Runs on the coherence queue after an update notification: another client changed an open image (librbd
    /// also notifies our own header changes, such as a growth step).
    private func imageChangedElsewhere(_ image: OpenImage) {
        cache.forgetImage(image.spec)
        logger.debug("\(image.path): update notification (another client, or our own header change); invalidating the kernel's view")
        invalidateImage(image.spec, data: true)
        // Describes it afresh (so the next getattr is answered at once) and checks it is still the same image.
        _ = try? refreshSummary(image.spec)
    }

    /// Describes an image afresh and caches it. Images rbdfs holds open under that name that the name no
    /// longer leads to (removed, moved to the trash, renamed or replaced by another client; a snapshot
    /// removed) are detached: see `detach(_:)`.
    func refreshSummary(_ spec: ImageSpec) throws(FSError) -> ImageSummary {
        guard let result = store.describeImages(pool: spec.pool, namespace: spec.namespace, names: [spec.name])[spec.name] else {
            throw .notFound(spec.description)
        }
        switch result {
        case .success(let summary):
            detachStale(spec, now: summary)
            cache.store(summary, for: spec)
            return summary
        case .failure(let error):
            if error.errno == .noSuchFileOrDirectory { detachStale(spec, now: nil) }
            throw .storage(error)
        }
    }

    /// Checks a shared open image against the image its name leads to now, describing it if the cached
    /// summary is older than the ttl (so at most once a ttl; a failure to tell keeps the handle).
    func verifyIdentity(_ image: OpenImage) {
        if let cached = cache.summary(image.spec) {
            if !image.isStill(cached) { detachStale(image.spec, now: cached) }
            return
        }
        _ = try? refreshSummary(image.spec)
    }

    /// Detaches the open images of `spec` that `summary` (nil: the name is free) shows are not there any
    /// more: they are no longer shared with new opens (which open whatever has the name now), and the files
    /// already open on them answer ESTALE, so that no descriptor reads or writes another image than the one
    /// it opened, nor a removed one unknowingly.
    private func detachStale(_ spec: ImageSpec, now summary: ImageSummary?) {
        // The inodes under the lock, so that a caller that finds nothing left to detach finds the inode
        // stale; the files after them, so that once a file answers ESTALE, so does its inode. (Not marked
        // under the lock: an image's own lock may be held through a slow resize.)
        let stale = lock.withLock { () -> [(image: OpenImage, inode: UInt64?)] in
            let found = openImages.values.filter { $0.spec == spec && !$0.isStill(summary) }
            return found.map { image in
                if openImages[image.key] === image { openImages[image.key] = nil }
                return (image, inodes.detach(image.key))
            }
        }
        guard !stale.isEmpty else { return }
        let directory = inodes.existingInode(of: parentDirectory(of: spec))
        for (image, staleInode) in stale {
            image.markReplaced()
            let now = summary.map { "image \($0.info.id)" } ?? "no image"
            logger.warning("\(image.path): another client removed, renamed or replaced it (the name now leads to \(now), not image \(image.imageID)\(image.snapshotID.map { " snapshot \($0)" } ?? "")); files open on it get ESTALE")
            // The name gets a new inode, so the kernel keeps the old image's pages and attributes apart from
            // the new one's; the old inode answers ESTALE.
            if let staleInode { invalidator?.invalidateInode(staleInode, data: true) }
            if let directory, let name = fileName(of: image.key) { invalidator?.invalidateEntry(parent: directory, name: name) }
        }
    }

    /// Queues the invalidation of everything the kernel may hold of an image: the image file's attributes
    /// (and pages, with `data`), its snapshot files' attributes and names, and the directory's listing.
    func invalidateImage(_ spec: ImageSpec, data: Bool) {
        guard let invalidator else { return }
        let held = inodes.inodes { key in
            switch key {
            case .image(let s), .snapshot(let s, _): return s == spec
            default: return false
            }
        }
        let directory = inodes.existingInode(of: parentDirectory(of: spec))
        for (key, inode) in held {
            switch key {
            case .image:
                invalidator.invalidateInode(inode, data: data)
            case .snapshot(_, let name):
                invalidator.invalidateInode(inode, data: false)
                // A snapshot removed elsewhere must not linger as a name; one still there is looked up again.
                if let directory { invalidator.invalidateEntry(parent: directory, name: "\(spec.name)@\(name)") }
            default:
                break
            }
        }
        if let directory { invalidator.invalidateInode(directory, data: true) }
    }

    /// Queues the invalidation of one node's attributes, if the kernel holds it (after our own changes the
    /// kernel would otherwise show stale for a second: a snapshot's link count after a clone, an image's
    /// times after a snapshot).
    func invalidateAttributes(of key: NodeKey) {
        guard let invalidator, let inode = inodes.existingInode(of: key) else { return }
        invalidator.invalidateInode(inode, data: false)
    }

    /// The directory that lists an image and its snapshots.
    func parentDirectory(of spec: ImageSpec) -> NodeKey {
        spec.namespace.isEmpty ? .pool(spec.pool) : .namespace(pool: spec.pool, name: spec.namespace)
    }

    /// A file node's name in its directory.
    func fileName(of key: NodeKey) -> String? {
        switch key {
        case .image(let spec): return spec.name
        case .snapshot(let spec, let name): return "\(spec.name)@\(name)"
        case .root, .pool, .namespace: return nil
        }
    }
}
