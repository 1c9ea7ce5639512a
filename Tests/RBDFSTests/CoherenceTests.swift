import Foundation
import Logging
import MemoryStore
import RBDFS
import Storage
import Testing

/// A kernel that records what the filesystem asks it to forget.
final class RecordingInvalidator: KernelInvalidator, @unchecked Sendable {
    enum Call: Hashable {
        case inode(UInt64, data: Bool)
        case entry(parent: UInt64, name: String)
    }

    private let lock = NSLock()
    private var recorded: [Call] = []

    func invalidateInode(_ inode: UInt64, data: Bool) { lock.withLock { recorded.append(.inode(inode, data: data)) } }

    func invalidateEntry(parent: UInt64, name: String) { lock.withLock { recorded.append(.entry(parent: parent, name: name)) } }

    var calls: [Call] { lock.withLock { recorded } }

    func reset() { lock.withLock { recorded.removeAll() } }

    /// Waits up to two seconds for `call` (update notifications arrive on the store's own queue).
    func waitFor(_ call: Call) -> Bool {
        for _ in 0..<200 {
            if calls.contains(call) { return true }
            usleep(10_000)
        }
        return false
    }
}

/// Changes made by other clients, seen through librbd update watches, and the kernel invalidations that
/// follow them and our own changes. The metadata ttl is an hour in most tests, so only a watch or an
/// invalidation can make a change visible: without them these tests fail.
@Suite struct CoherenceTests {
    let mib: UInt64 = 1 << 20
    let disk = ImageSpec(pool: "images", name: "disk")

    func harness(ttl: Duration = .seconds(3600), _ configure: (MemoryStore) throws -> Void = { _ in })
        throws -> (Harness, RecordingInvalidator)
    {
        var options = FSOptions()
        options.metadataTTL = ttl
        let h = try Harness(options: options, configure: configure)
        let kernel = RecordingInvalidator()
        h.fs.invalidator = kernel
        return (h, kernel)
    }

    @Test func aResizeElsewhereReachesAnOpenFileAndTheKernel() throws {
        let (h, kernel) = try harness { store in try store.createImage(disk, size: 8 * mib, options: .init()) }
        let pool = try h.path("images")
        let inode = try h.path("images", "disk")
        let file = try h.fs.open(inode, flags: O_RDONLY)
        defer { h.fs.release(file) }
        #expect(try h.fs.getattr(inode).size == 8 * mib)
        try h.elsewhere(disk) { try $0.resize(to: 24 * mib) }
        #expect(kernel.waitFor(.inode(inode, data: true)))
        h.fs.waitForCoherenceWork()
        #expect(kernel.calls.contains(.inode(pool, data: true)))
        // The cached summary was forgotten: the attributes are right at once, not after the ttl.
        #expect(try h.fs.getattr(inode).size == 24 * mib)
        #expect(try h.read(file, at: 20 * mib, count: 4096).count == 4096)
    }

    @Test func snapshotsMadeAndRemovedElsewhereShowAtOnce() throws {
        let (h, kernel) = try harness { store in
            try store.createImage(disk, size: 8 * mib, options: .init())
            let image = try store.openImage(disk, snapshot: nil, readOnly: false)
            try image.createSnapshot("old")
            image.close()
        }
        let pool = try h.path("images")
        let file = try h.fs.open(try h.path("images", "disk"), flags: O_RDWR)
        defer { h.fs.release(file) }
        let old = try h.path("images", "disk@old")
        expectErrno(.noSuchFileOrDirectory) { _ = try h.path("images", "disk@new") }
        try h.elsewhere(disk) { other in
            try other.createSnapshot("new")
            try other.removeSnapshot("old")
        }
        #expect(kernel.waitFor(.entry(parent: pool, name: "disk@old")))
        #expect(kernel.calls.contains(.inode(old, data: false)))
        h.fs.waitForCoherenceWork()
        #expect(try h.fs.getattr(try h.path("images", "disk@new")).permissions == 0o444)
        expectErrno(.noSuchFileOrDirectory) { _ = try h.fs.getattr(old) }
    }

    @Test func aCloneThroughTheMountInvalidatesTheSnapshotsLinkCount() throws {
        let (h, kernel) = try harness { store in
            try store.createImage(disk, size: 8 * mib, options: .init())
            let image = try store.openImage(disk, snapshot: nil, readOnly: false)
            try image.createSnapshot("s")
            try image.protectSnapshot("s")
            image.close()
        }
        let pool = try h.path("images")
        let snap = try h.path("images", "disk@s")
        #expect(try h.fs.getattr(snap).linkCount == 1)
        _ = try h.fs.link(snap, newParent: pool, newName: "child")
        #expect(kernel.calls.contains(.inode(snap, data: false)))
        #expect(try h.fs.getattr(snap).linkCount == 2)
        kernel.reset()
        try h.fs.unlink(parent: pool, name: "child")
        #expect(kernel.calls.contains(.inode(snap, data: false)))
        #expect(try h.fs.getattr(snap).linkCount == 1)
    }

    @Test func snapshotsThroughTheMountInvalidateTheImagesAttributes() throws {
        let (h, kernel) = try harness { store in try store.createImage(disk, size: 8 * mib, options: .init()) }
        let pool = try h.path("images")
        let image = try h.path("images", "disk")
        _ = try h.fs.link(image, newParent: pool, newName: "disk@s")
        #expect(kernel.calls.contains(.inode(image, data: false)))
        kernel.reset()
        try h.fs.unlink(parent: pool, name: "disk@s")
        #expect(kernel.calls.contains(.inode(image, data: false)))
    }

    @Test func anImageReplacedElsewhereIsNeverReadThroughTheOldFileOrTheName() throws {
        let (h, kernel) = try harness { store in try store.createImage(disk, size: mib, options: .init()) }
        let pool = try h.path("images")
        let inode = try h.path("images", "disk")
        let old = try h.fs.open(inode, flags: O_RDWR)
        defer { h.fs.release(old) }
        #expect(try h.write(old, at: 0, [1, 1, 1, 1]) == 4)
        // Another client moves the image away (rbd trash mv and rbd mv both keep it open) and makes a new one.
        try h.store.renameImage(disk, to: "disk-away")
        try h.store.createImage(disk, size: 2 * mib, options: .init())
        try h.elsewhere(disk) { other in
            try write(other, [UInt8](repeating: 2, count: 4))
        }
        #expect(kernel.waitFor(.entry(parent: pool, name: "disk")))
        h.fs.waitForCoherenceWork()
        expectErrno(.staleNFSFileHandle) { _ = try h.read(old, at: 0, count: 4) }
        expectErrno(.staleNFSFileHandle) { _ = try h.write(old, at: 0, [3]) }
        // The name has a new inode: the kernel keeps the two images' pages and attributes apart.
        #expect(kernel.calls.contains(.inode(inode, data: true)))
        expectErrno(.staleNFSFileHandle) { _ = try h.fs.getattr(inode) }
        let newInode = try h.path("images", "disk")
        #expect(newInode != inode)
        let fresh = try h.fs.open(newInode, flags: O_RDONLY)
        defer { h.fs.release(fresh) }
        #expect(try h.read(fresh, at: 0, count: 4) == [2, 2, 2, 2])
        #expect(try h.fs.getattr(newInode).size == 2 * mib)
    }

    @Test func aSnapshotReplacedElsewhereIsNeverReadThroughTheOldFile() throws {
        let (h, _) = try harness(ttl: .milliseconds(50)) { store in
            try store.createImage(disk, size: mib, options: .init())
            let image = try store.openImage(disk, snapshot: nil, readOnly: false)
            try image.createSnapshot("s")
            image.close()
        }
        let snap = try h.path("images", "disk@s")
        let old = try h.fs.open(snap, flags: O_RDONLY)
        defer { h.fs.release(old) }
        #expect(try h.read(old, at: 0, count: 2) == [0, 0])
        // The snapshot is remade elsewhere, with other data, under the same name.
        try h.elsewhere(disk) { other in
            try other.removeSnapshot("s")
            try write(other, [UInt8](repeating: 5, count: 2))
            try other.createSnapshot("s")
        }
        h.fs.waitForCoherenceWork()
        usleep(100_000)  // past the ttl
        // The kernel's old inode is stale (open would look the name up again); the name leads to the new one.
        expectErrno(.staleNFSFileHandle) { _ = try h.fs.open(snap, flags: O_RDONLY) }
        expectErrno(.staleNFSFileHandle) { _ = try h.fs.getattr(snap) }
        try h.fsync(old)  // close(2) of a read-only file whose snapshot went has nothing to report
        let fresh = try h.fs.open(try h.path("images", "disk@s"), flags: O_RDONLY)
        defer { h.fs.release(fresh) }
        #expect(try h.read(fresh, at: 0, count: 2) == [5, 5])
        expectErrno(.staleNFSFileHandle) { _ = try h.read(old, at: 0, count: 2) }
    }

    @Test func anImageRemovedUnderAReadOnlyMountAnswersESTALE() throws {
        var options = FSOptions()
        options.readOnly = true
        options.metadataTTL = .milliseconds(100)
        let h = try Harness(options: options) { store in try store.createImage(ImageSpec(pool: "images", name: "disk"), size: mib, options: .init()) }
        let inode = try h.path("images", "disk")
        let file = try h.fs.open(inode, flags: O_RDONLY)
        defer { h.fs.release(file) }
        // A read-only handle is no watcher: another client may remove the image while it is open.
        try h.store.removeImage(disk)
        // Until rbdfs finds it out, the store itself answers (ENOENT here; librbd reads zeros); then ESTALE.
        var stale = false
        for _ in 0..<100 where !stale {
            do {
                _ = try h.read(file, at: 0, count: 4)
            } catch {
                stale = (error as? FSError)?.errno == .staleNFSFileHandle
            }
            if !stale { usleep(20_000) }
        }
        #expect(stale)
        expectErrno(.staleNFSFileHandle) { _ = try h.fs.getattr(inode) }
        expectErrno(.noSuchFileOrDirectory) { _ = try h.path("images", "disk") }
    }

    @Test func withoutAnInvalidatorNothingIsQueuedAndNothingBreaks() throws {
        let h = try Harness { store in try store.createImage(ImageSpec(pool: "images", name: "disk"), size: mib, options: .init()) }
        let file = try h.fs.open(try h.path("images", "disk"), flags: O_RDONLY)
        try h.elsewhere(disk) { try $0.resize(to: 2 * mib) }
        usleep(50_000)
        h.fs.waitForCoherenceWork()
        #expect(try h.fs.getattr(try h.path("images", "disk")).size == 2 * mib)
        h.fs.release(file)
    }
}
