import Foundation
import Logging
import MemoryStore
import RBDFS
import Storage
import SystemPackage
import Testing

/// The filesystem driven directly, with no FUSE and no cluster: the in-memory store behind the same protocol.
final class Harness {
    let store: MemoryStore
    let fs: RBDFilesystem

    init(options: FSOptions = FSOptions(), configure: (MemoryStore) throws -> Void = { _ in }) throws {
        store = MemoryStore()
        try configure(store)
        fs = RBDFilesystem(store: store, options: options, logger: Logger(label: "test"))
    }

    func path(_ components: String...) throws -> UInt64 {
        var inode = InodeTable.rootInode
        for name in components { inode = try fs.lookup(parent: inode, name: name).inode }
        return inode
    }

    func read(_ handle: UInt64, at offset: UInt64, count: Int) throws -> [UInt8] {
        let outcome = Outcome<[UInt8]>()
        fs.read(handle, offset: offset, size: count) { result in outcome.set(result.map { Array($0) }) }
        return try outcome.wait()
    }

    func write(_ handle: UInt64, at offset: UInt64, _ bytes: [UInt8], writeThrough: Bool = true) throws -> Int {
        let outcome = Outcome<Int>()
        bytes.withUnsafeBytes { data in
            fs.write(handle, offset: offset, data: data, writeThrough: writeThrough) { result in outcome.set(result) }
        }
        return try outcome.wait()
    }

    func fsync(_ handle: UInt64) throws {
        let outcome = Outcome<Void>()
        fs.fsync(handle) { outcome.set($0) }
        try outcome.wait()
    }

    /// Another client: its own handle of the image head, closed afterwards.
    func elsewhere(_ spec: ImageSpec, _ change: (any ImageHandle) throws -> Void) throws {
        let other = try store.openImage(spec, snapshot: nil, readOnly: false)
        defer { other.close() }
        try change(other)
    }
}

/// Writes through a store handle and waits for it.
func write(_ handle: any ImageHandle, at offset: UInt64 = 0, _ bytes: [UInt8]) throws {
    let outcome = Outcome<Void>()
    bytes.withUnsafeBytes { data in
        handle.write(at: offset, from: data) { outcome.set($0.mapError { .storage($0) }) }
    }
    try outcome.wait()
}

/// Reads through a store handle and waits for it.
func read(_ handle: any ImageHandle, at offset: UInt64 = 0, count: Int) throws -> [UInt8] {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
    defer { buffer.deallocate() }
    let outcome = Outcome<Int>()
    handle.read(at: offset, into: buffer) { outcome.set($0.mapError { .storage($0) }) }
    return Array(buffer.prefix(try outcome.wait()))
}

/// Waits for one asynchronous reply.
final class Outcome<T>: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    private var result: Result<T, FSError>?

    func set(_ result: Result<T, FSError>) {
        self.result = result
        done.signal()
    }

    func wait() throws -> T {
        done.wait()
        return try result!.get()
    }
}

func expectErrno(_ errno: Errno, _ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        try body()
        Issue.record("expected \(errno), got success", sourceLocation: sourceLocation)
    } catch let error as FSError {
        #expect(error.errno == errno, "\(error)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("expected FSError \(errno), got \(error)", sourceLocation: sourceLocation)
    }
}

@Suite struct FilesystemTests {
    let mib: UInt64 = 1 << 20

    @Test func rootListsRBDPoolsAsDirectories() throws {
        let h = try Harness()
        let listing = try h.fs.directoryItems(try h.fs.openDirectory(InodeTable.rootInode))
        #expect(listing.map(\.name).sorted() == ["images", "vms", "volumes"])
        #expect(listing.allSatisfy { $0.kind == .directory })
        #expect(try h.fs.getattr(try h.path("images")).kind == .directory)
        expectErrno(.noSuchFileOrDirectory) { _ = try h.path("nope") }
    }

    @Test func imagesSnapshotsAndNamespacesAreListed() throws {
        let h = try Harness { store in
            try store.createImage(ImageSpec(pool: "images", name: "disk"), size: 8 * mib, options: .init())
            try store.createNamespace(pool: "images", name: "tenant")
            try store.createImage(ImageSpec(pool: "images", namespace: "tenant", name: "vol"), size: mib, options: .init())
            let image = try store.openImage(ImageSpec(pool: "images", name: "disk"), snapshot: nil, readOnly: false)
            try image.createSnapshot("snap")
            image.close()
        }
        let pool = try h.path("images")
        let names = try h.fs.directoryItems(try h.fs.openDirectory(pool)).map(\.name)
        #expect(names == ["tenant", "disk", "disk@snap"])
        let attributes = try h.fs.getattr(try h.path("images", "disk"))
        #expect(attributes.size == 8 * mib && attributes.permissions == 0o644 && attributes.kind == .regularFile)
        #expect(try h.fs.getattr(try h.path("images", "disk@snap")).permissions == 0o444)
        #expect(try h.fs.getattr(try h.path("images", "tenant", "vol")).size == mib)
        expectErrno(.noSuchFileOrDirectory) { _ = try h.path("images", "disk@other") }
        expectErrno(.invalidArgument) { _ = try h.path("images", "a@b@c") }
    }

    @Test func onePoolAsRoot() throws {
        var options = FSOptions()
        options.pool = "vms"
        let h = try Harness(options: options) { store in
            try store.createImage(ImageSpec(pool: "vms", name: "x_disk"), size: mib, options: .init())
        }
        #expect(try h.fs.directoryItems(try h.fs.openDirectory(InodeTable.rootInode)).map(\.name) == ["x_disk"])
    }

    @Test func writeThenReadAcrossObjectsAndEOF() throws {
        let h = try Harness { store in
            try store.createImage(ImageSpec(pool: "images", name: "disk"), size: 12 * mib, options: .init())
        }
        let file = try h.fs.open(try h.path("images", "disk"), flags: O_RDWR)
        let data = (0..<Int(6 * mib)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        #expect(try h.write(file, at: 3 * mib, data) == data.count)
        #expect(try h.read(file, at: 3 * mib, count: data.count) == data)
        // A read crossing the end is clamped; at or past the end it is empty, never an error.
        #expect(try h.read(file, at: 12 * mib - 10, count: 4096).count == 10)
        #expect(try h.read(file, at: 12 * mib, count: 4096).isEmpty)
        #expect(try h.read(file, at: 100 * mib, count: 4096).isEmpty)
        h.fs.release(file)
    }

    @Test func writePastTheEndGrowsThenTrimsOnFlush() throws {
        let spec = ImageSpec(pool: "images", name: "grow")
        let h = try Harness { store in try store.createImage(spec, size: 0, options: .init()) }
        let inode = try h.path("images", "grow")
        let file = try h.fs.open(inode, flags: O_WRONLY)
        #expect(try h.write(file, at: 0, Array(repeating: 7, count: 100_000)) == 100_000)
        // The file shows exactly what was written, while the image is over-allocated by a growth step.
        #expect(try h.fs.getattr(inode).size == 100_000)
        #expect(try h.store.openImage(spec, snapshot: nil, readOnly: true).size() > 100_000)
        try h.fsync(file)
        #expect(try h.store.openImage(spec, snapshot: nil, readOnly: true).size() == 100_000)
        h.fs.release(file)
    }

    @Test func snapshotsAreReadOnly() throws {
        let h = try Harness { store in
            let spec = ImageSpec(pool: "images", name: "disk")
            try store.createImage(spec, size: mib, options: .init())
            let image = try store.openImage(spec, snapshot: nil, readOnly: false)
            try image.createSnapshot("s")
            image.close()
        }
        let snap = try h.path("images", "disk@s")
        expectErrno(.readOnlyFileSystem) { _ = try h.fs.open(snap, flags: O_RDWR) }
        expectErrno(.readOnlyFileSystem) { _ = try h.fs.setattr(snap, changes: AttributeChanges(size: 0)) }
        let file = try h.fs.open(snap, flags: O_RDONLY)
        #expect(try h.read(file, at: 0, count: 10) == Array(repeating: 0, count: 10))
        h.fs.release(file)
    }

    @Test func readOnlyMountRefusesWritesInTheDaemon() throws {
        var options = FSOptions()
        options.readOnly = true
        let h = try Harness(options: options) { store in
            try store.createImage(ImageSpec(pool: "images", name: "disk"), size: mib, options: .init())
        }
        let inode = try h.path("images", "disk")
        expectErrno(.readOnlyFileSystem) { _ = try h.fs.open(inode, flags: O_WRONLY) }
        expectErrno(.readOnlyFileSystem) { _ = try h.fs.setattr(inode, changes: AttributeChanges(size: 2 * mib)) }
        #expect(try h.fs.getattr(inode).permissions == 0o444)
    }

    @Test func shrinkingAwayDataIsRefusedUnlessAllowed() throws {
        let spec = ImageSpec(pool: "images", name: "disk")
        let h = try Harness { store in try store.createImage(spec, size: 16 * mib, options: .init()) }
        let inode = try h.path("images", "disk")
        let file = try h.fs.open(inode, flags: O_RDWR)
        _ = try h.write(file, at: 9 * mib, [1, 2, 3])
        // Growing is free; shrinking over empty space is free; cutting off data is EPERM.
        #expect(try h.fs.setattr(inode, changes: AttributeChanges(size: 32 * mib)).size == 32 * mib)
        #expect(try h.fs.setattr(inode, changes: AttributeChanges(size: 12 * mib)).size == 12 * mib)
        expectErrno(.notPermitted) { _ = try h.fs.setattr(inode, changes: AttributeChanges(size: 4 * mib)) }
        expectErrno(.notPermitted) { _ = try h.fs.open(inode, flags: O_WRONLY | O_TRUNC) }
        #expect(try h.read(file, at: 9 * mib, count: 3) == [1, 2, 3])
        h.fs.release(file)

        var options = FSOptions()
        options.allowShrink = true
        let permissive = RBDFilesystem(store: h.store, options: options, logger: Logger(label: "test"))
        var inode2 = InodeTable.rootInode
        for name in ["images", "disk"] { inode2 = try permissive.lookup(parent: inode2, name: name).inode }
        #expect(try permissive.setattr(inode2, changes: AttributeChanges(size: 4 * mib)).size == 4 * mib)
    }

    @Test func storageErrorsReachTheCallerWithTheirErrno() throws {
        let h = try Harness { store in
            try store.createImage(ImageSpec(pool: "images", name: "disk"), size: 8 * mib, options: .init())
        }
        let file = try h.fs.open(try h.path("images", "disk"), flags: O_RDWR)
        h.store.injectFault(.ioError, operation: "rbd_aio_write")
        expectErrno(.ioError) { _ = try h.write(file, at: 0, Array(repeating: 1, count: Int(6 * mib))) }
        h.store.injectFault(.ioError, operation: "rbd_aio_read")
        expectErrno(.ioError) { _ = try h.read(file, at: 0, count: 4096) }
        h.store.injectFault(.ioError, operation: "rbd_aio_flush")
        expectErrno(.ioError) { try h.fsync(file) }
        h.fs.release(file)
    }

    @Test func chmodIsRefusedAndTimesAreAccepted() throws {
        let h = try Harness { store in
            try store.createImage(ImageSpec(pool: "images", name: "disk"), size: mib, options: .init())
        }
        let inode = try h.path("images", "disk")
        expectErrno(.notPermitted) { _ = try h.fs.setattr(inode, changes: AttributeChanges(mode: 0o600)) }
        #expect(try h.fs.setattr(inode, changes: AttributeChanges(times: true)).size == mib)
    }
}

@Suite struct ListingPrefetchTests {
    let mib: UInt64 = 1 << 20

    /// Six Glance images (each with its protected snapshot `snap`): img0's snapshot has a clone, img2's holds
    /// two objects of data.
    private func glanceImages() throws -> Harness {
        try Harness { store in
            for index in 0..<6 {
                let spec = ImageSpec(pool: "images", name: "img\(index)")
                try store.createImage(spec, size: 4 * mib, options: .init(objectSize: mib))
                let image = try store.openImage(spec, snapshot: nil, readOnly: false)
                if index == 2 {
                    let written = Outcome<Void>()
                    [UInt8](repeating: 7, count: Int(mib + 10)).withUnsafeBytes { data in
                        image.write(at: mib, from: data) { written.set($0.mapError { FSError.storage($0) }) }
                    }
                    try written.wait()
                }
                try image.createSnapshot("snap")
                try image.protectSnapshot("snap")
                image.close()
            }
            try store.cloneImage(parent: ImageSpec(pool: "images", name: "img0"), snapshot: "snap",
                                 child: ImageSpec(pool: "vms", name: "clone"), options: .init())
        }
    }

    /// `ls -l` of a pool of Glance images: the link count and used bytes of every snapshot file are found
    /// while the directory is listed, in one call of the store (which reads them without opening the
    /// snapshots), not one snapshot at a time as readdirplus asks.
    @Test func aListingFindsItsSnapshotsDetailsAtOnce() throws {
        let h = try glanceImages()
        h.store.resetCallCounts()
        let items = try h.fs.directoryItems(try h.fs.openDirectory(try h.path("images")))
        #expect(items.count == 12)
        #expect(h.store.callCount("describe_snapshot") == 6)
        #expect(h.store.callCount("rbd_list_children3") == 0 && h.store.callCount("rbd_diff_iterate2") == 0)
        let afterListing = h.store.callCounts
        var attributes: [String: FileAttributes] = [:]
        for item in items {
            attributes[item.name] = try #require(h.fs.entry(forListed: item)).attributes
        }
        #expect(h.store.callCounts == afterListing, "readdirplus asked the store again")
        #expect(attributes["img0@snap"]?.linkCount == 2)
        #expect(attributes["img1@snap"]?.linkCount == 1)
        #expect(attributes["img2@snap"]?.blocks == 2 * mib / 512)
        #expect(attributes["img1@snap"]?.blocks == 0)
        let children = try h.fs.extendedAttribute(try h.path("images", "img0@snap"), name: "user.rbd.children")
        #expect(String(decoding: children, as: UTF8.self) == "vms/clone\n")
        #expect(h.store.callCount("rbd_list_children3") == 0, "the children were not kept from the listing")
    }

    /// A snapshot whose details the store could not find is listed all the same, and its own lookup finds
    /// them by opening it, as before.
    @Test func aSnapshotWhoseDetailsFailedIsFoundByItsLookup() throws {
        let h = try glanceImages()
        h.store.injectFault(.ioError, operation: "describe_snapshot", image: "images/img0@snap")
        let items = try h.fs.directoryItems(try h.fs.openDirectory(try h.path("images")))
        #expect(items.count == 12)
        h.store.resetCallCounts()
        let snapshot = try #require(items.first { $0.name == "img0@snap" })
        #expect(h.fs.entry(forListed: snapshot)?.attributes.linkCount == 2)
        #expect(h.store.callCount("rbd_list_children3") == 1)
        let other = try #require(items.first { $0.name == "img2@snap" })
        #expect(h.fs.entry(forListed: other)?.attributes.blocks == 2 * mib / 512)
        #expect(h.store.callCount("rbd_diff_iterate2") == 1, "only the failed snapshot was opened")
    }
}

/// Idle memory (read buffers, malloc's arenas) is given back once no image is open, at most once per interval;
/// a last close within the interval has it done at the interval's end rather than skipped.
@Suite(.serialized) struct IdleMemoryReleaseTests {
    final class Releases: @unchecked Sendable {
        private let lock = NSLock()
        private var count = 0
        func add() { lock.withLock { count += 1 } }
        var value: Int { lock.withLock { count } }
    }

    func poll(seconds: Double, _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while !condition() {
            if Date() > deadline { return false }
            usleep(20_000)
        }
        return true
    }

    func harness(_ releases: Releases) throws -> Harness {
        let h = try Harness { store in
            try store.createImage(ImageSpec(pool: "images", name: "disk"), size: 4 << 20, options: .init())
        }
        h.fs.memoryReleaseInterval = .milliseconds(300)
        h.fs.releaseIdleMemory = { releases.add() }
        return h
    }

    @Test func aCloseWithinTheIntervalReleasesAtItsEnd() throws {
        let releases = Releases()
        let h = try harness(releases)
        let disk = try h.path("images", "disk")
        h.fs.release(try h.fs.open(disk, flags: O_RDONLY))
        #expect(releases.value == 1, "the first last-close releases at once")
        h.fs.release(try h.fs.open(disk, flags: O_RDONLY))
        #expect(releases.value == 1, "a second one within the interval waits")
        #expect(poll(seconds: 3) { releases.value == 2 }, "and releases when the interval ends")
        usleep(600_000)
        #expect(releases.value == 2, "once")
    }

    @Test func noReleaseWhileAnImageIsOpenAgain() throws {
        let releases = Releases()
        let h = try harness(releases)
        let disk = try h.path("images", "disk")
        h.fs.release(try h.fs.open(disk, flags: O_RDONLY))
        h.fs.release(try h.fs.open(disk, flags: O_RDONLY))
        let file = try h.fs.open(disk, flags: O_RDONLY)
        usleep(1_500_000)  // well past the interval, so the scheduled release has run (on a busy machine too)
        #expect(releases.value == 1, "the scheduled release found an image open")
        h.fs.release(file)
        #expect(releases.value == 2, "the interval has passed: the last close releases at once")

    }
}
