import Foundation
import Logging
import MemoryStore
import RBDFS
import Storage
import SystemPackage
import Testing

/// Thin images on the in-memory store (issue 4): fallocate, SEEK_DATA / SEEK_HOLE, zero-skipping on import,
/// st_blocks from the bytes an image really uses, statfs.
@Suite struct ThinTests {
    let mib: UInt64 = 1 << 20

    // fallocate(2) modes (linux/falloc.h) and lseek(2) whence values (Glibc hides them behind _GNU_SOURCE).
    let keepSize: Int32 = 0x01, punchHole: Int32 = 0x02, collapseRange: Int32 = 0x08, zeroRange: Int32 = 0x10
    let insertRange: Int32 = 0x20, unshareRange: Int32 = 0x40
    let seekData: Int32 = 3, seekHole: Int32 = 4

    /// Bytes that differ from offset to offset and are never zero, so a misplaced extent or a lost byte shows.
    func pattern(_ count: Int, seed: UInt8 = 0) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) ^ seed | 1 }
    }

    func zeros(_ count: UInt64) -> [UInt8] { [UInt8](repeating: 0, count: Int(count)) }

    /// An image of `size` bytes made outside the mount, optionally filled with `data` from offset 0.
    func harness(_ name: String = "disk", size: UInt64, data: [UInt8] = [], options: FSOptions = FSOptions()) throws -> Harness {
        try Harness(options: options) { store in
            let spec = ImageSpec(pool: "images", name: name)
            try store.createImage(spec, size: size, options: .init())
            if !data.isEmpty {
                let image = try store.openImage(spec, snapshot: nil, readOnly: false)
                defer { image.close() }
                let written = DispatchSemaphore(value: 0)
                data.withUnsafeBytes { bytes in image.write(at: 0, from: bytes) { _ in written.signal() } }
                written.wait()
            }
        }
    }

    // MARK: - fallocate

    @Test func punchHoleReadsAsZerosKeepsTheRestAndReleasesWholeObjects() throws {
        let spec = ImageSpec(pool: "images", name: "disk")
        var expected = pattern(Int(16 * mib))
        let h = try harness(size: 16 * mib, data: expected)
        let inode = try h.path("images", "disk")
        let file = try h.fs.open(inode, flags: O_RDWR)
        defer { h.fs.release(file) }
        #expect(h.store.rawObjectCount(of: spec) == 4)

        // Unaligned, inside one object: exactly those bytes become zeros.
        try h.fallocate(file, mode: punchHole | keepSize, offset: 9 * mib + 100, length: 1000)
        expected.replaceSubrange(Int(9 * mib + 100)..<Int(9 * mib + 1100), with: repeatElement(0, count: 1000))
        #expect(try h.read(file, at: 9 * mib, count: 4096) == Array(expected[Int(9 * mib)..<Int(9 * mib + 4096)]))
        #expect(h.store.rawObjectCount(of: spec) == 4)

        // A whole object is given back.
        try h.fallocate(file, mode: punchHole | keepSize, offset: 4 * mib, length: 4 * mib)
        expected.replaceSubrange(Int(4 * mib)..<Int(8 * mib), with: repeatElement(0, count: Int(4 * mib)))
        #expect(h.store.rawObjectCount(of: spec) == 3)
        #expect(try h.read(file, at: 0, count: Int(16 * mib)) == expected)
        #expect(try h.fs.getattr(inode).size == 16 * mib, "KEEP_SIZE")

        // Past the end: clamped to the image, which keeps its size.
        try h.fallocate(file, mode: punchHole | keepSize, offset: 15 * mib, length: 8 * mib)
        try h.fallocate(file, mode: punchHole | keepSize, offset: 40 * mib, length: mib)
        expected.replaceSubrange(Int(15 * mib)..<Int(16 * mib), with: repeatElement(0, count: Int(mib)))
        #expect(try h.read(file, at: 0, count: Int(16 * mib)) == expected)
        #expect(try h.fs.getattr(inode).size == 16 * mib)
        #expect(try h.store.openImage(spec, snapshot: nil, readOnly: true).size() == 16 * mib)
        #expect(h.store.callCount("rbd_aio_write_zeroes") >= 3)
    }

    @Test func zeroRangeReadsAsZerosAndGrowsUnlessKeepSize() throws {
        let spec = ImageSpec(pool: "images", name: "disk")
        var expected = pattern(Int(16 * mib))
        let h = try harness(size: 16 * mib, data: expected)
        let inode = try h.path("images", "disk")
        let file = try h.fs.open(inode, flags: O_RDWR)
        defer { h.fs.release(file) }

        // Across an object boundary, unaligned at both ends.
        try h.fallocate(file, mode: zeroRange | keepSize, offset: 3 * mib + 512, length: 2 * mib + 1000)
        expected.replaceSubrange(Int(3 * mib + 512)..<Int(5 * mib + 1512), with: repeatElement(0, count: Int(2 * mib + 1000)))
        #expect(try h.read(file, at: 0, count: Int(16 * mib)) == expected)
        #expect(h.store.rawObjectCount(of: spec) <= 4)

        // Without KEEP_SIZE, a range past the end grows the file (as on any Linux filesystem).
        try h.fallocate(file, mode: zeroRange, offset: 15 * mib, length: 2 * mib)
        expected.replaceSubrange(Int(15 * mib)..<Int(16 * mib), with: repeatElement(0, count: Int(mib)))
        expected += zeros(mib)
        #expect(try h.fs.getattr(inode).size == 17 * mib)
        #expect(try h.read(file, at: 0, count: Int(17 * mib)) == expected)
        try h.fsync(file)
        #expect(try h.store.openImage(spec, snapshot: nil, readOnly: true).size() == 17 * mib)
    }

    @Test func plainFallocateGrowsPastTheEndAndAllocatesNothing() throws {
        let spec = ImageSpec(pool: "images", name: "disk")
        let h = try harness(size: 4 * mib)
        let inode = try h.path("images", "disk")
        let file = try h.fs.open(inode, flags: O_RDWR)
        defer { h.fs.release(file) }
        try h.fallocate(file, mode: 0, offset: 0, length: 20 * mib)
        #expect(try h.fs.getattr(inode).size == 20 * mib)
        try h.fsync(file)
        #expect(try h.store.openImage(spec, snapshot: nil, readOnly: true).size() == 20 * mib)
        // Inside the image: nothing to do. KEEP_SIZE past the end: nothing to do either.
        try h.fallocate(file, mode: 0, offset: mib, length: mib)
        try h.fallocate(file, mode: keepSize, offset: 0, length: 40 * mib)
        try h.fsync(file)
        #expect(try h.fs.getattr(inode).size == 20 * mib)
        #expect(try h.store.openImage(spec, snapshot: nil, readOnly: true).size() == 20 * mib)
        #expect(h.store.rawObjectCount(of: spec) == 0, "space is thin: fallocate allocates no object")
        #expect(try h.read(file, at: 0, count: Int(20 * mib)) == zeros(20 * mib))
    }

    @Test func otherFallocateModesAreNotSupported() throws {
        let data = pattern(Int(8 * mib))
        let h = try harness(size: 8 * mib, data: data)
        let inode = try h.path("images", "disk")
        let file = try h.fs.open(inode, flags: O_RDWR)
        defer { h.fs.release(file) }
        for mode in [collapseRange, insertRange, unshareRange, punchHole | zeroRange | keepSize, 0x100] {
            expectErrno(.notSupported) { try h.fallocate(file, mode: mode, offset: 0, length: 4 * mib) }
        }
        #expect(try h.read(file, at: 0, count: Int(8 * mib)) == data)
        #expect(try h.fs.getattr(inode).size == 8 * mib)
    }

    @Test func fallocateOnASnapshotIsEROFS() throws {
        let spec = ImageSpec(pool: "images", name: "disk")
        let data = pattern(Int(8 * mib))
        let h = try harness(size: 8 * mib, data: data)
        let image = try h.store.openImage(spec, snapshot: nil, readOnly: false)
        try image.createSnapshot("s")
        image.close()
        let snap = try h.path("images", "disk@s")
        let file = try h.fs.open(snap, flags: O_RDONLY)
        defer { h.fs.release(file) }
        for mode in [punchHole | keepSize, zeroRange, 0] {
            expectErrno(.readOnlyFileSystem) { try h.fallocate(file, mode: mode, offset: 0, length: 16 * mib) }
        }
        #expect(try h.read(file, at: 0, count: Int(8 * mib)) == data)
        #expect(try h.fs.getattr(snap).size == 8 * mib)
    }

    @Test func fallocateAfterAnUploadIsSealedIsEROFS() throws {
        let h = try Harness()
        let (_, file) = try h.fs.create(parent: try h.path("images"), name: "up@snap", flags: O_WRONLY | O_CREAT)
        defer { h.fs.release(file) }
        _ = try h.write(file, at: 0, pattern(4096))
        // While uploading the file takes fallocate like any image.
        try h.fallocate(file, mode: punchHole | keepSize, offset: 0, length: 100)
        let closed = Outcome<Void>()
        h.fs.flush(file) { closed.set($0) }
        try closed.wait()
        expectErrno(.readOnlyFileSystem) { try h.fallocate(file, mode: punchHole | keepSize, offset: 0, length: 4096) }
    }

    // MARK: - SEEK_DATA / SEEK_HOLE

    @Test func seekDataAndHoleFollowTheObjectsHoldingData() throws {
        let h = try harness(size: 64 * mib)
        let file = try h.fs.open(try h.path("images", "disk"), flags: O_RDWR)
        defer { h.fs.release(file) }
        expectErrno(.noSuchAddressOrDevice) { _ = try h.fs.seek(file, offset: 0, whence: seekData) }
        #expect(try h.fs.seek(file, offset: 0, whence: seekHole) == 0)

        _ = try h.write(file, at: 9 * mib, pattern(4096))
        #expect(try h.fs.seek(file, offset: 0, whence: seekData) == 8 * mib)
        #expect(try h.fs.seek(file, offset: 9 * mib, whence: seekData) == 9 * mib)
        #expect(try h.fs.seek(file, offset: 0, whence: seekHole) == 0)
        #expect(try h.fs.seek(file, offset: 8 * mib, whence: seekHole) == 12 * mib)
        #expect(try h.fs.seek(file, offset: 9 * mib, whence: seekHole) == 12 * mib)
        #expect(try h.fs.seek(file, offset: 40 * mib, whence: seekHole) == 40 * mib)
        // Past the last data: ENXIO for SEEK_DATA; at or past the end: ENXIO for both.
        expectErrno(.noSuchAddressOrDevice) { _ = try h.fs.seek(file, offset: 12 * mib, whence: seekData) }
        expectErrno(.noSuchAddressOrDevice) { _ = try h.fs.seek(file, offset: 64 * mib, whence: seekData) }
        expectErrno(.noSuchAddressOrDevice) { _ = try h.fs.seek(file, offset: 64 * mib, whence: seekHole) }
        expectErrno(.noSuchAddressOrDevice) { _ = try h.fs.seek(file, offset: 100 * mib, whence: seekHole) }
        expectErrno(.invalidArgument) { _ = try h.fs.seek(file, offset: 0, whence: 0) }

        // A write through the file is seen at once (the cached extents are dropped).
        _ = try h.write(file, at: 40 * mib + 10, pattern(10))
        #expect(try h.fs.seek(file, offset: 12 * mib, whence: seekData) == 40 * mib)
        #expect(try h.fs.seek(file, offset: 40 * mib, whence: seekHole) == 44 * mib)
        // So is a punched hole.
        try h.fallocate(file, mode: punchHole | keepSize, offset: 8 * mib, length: 4 * mib)
        #expect(try h.fs.seek(file, offset: 0, whence: seekData) == 40 * mib)
        #expect(try h.fs.seek(file, offset: 0, whence: seekHole) == 0)
    }

    @Test func seekHoleInTheLastPartialObjectIsTheSize() throws {
        let h = try harness(size: 10 * mib)
        let file = try h.fs.open(try h.path("images", "disk"), flags: O_RDWR)
        defer { h.fs.release(file) }
        _ = try h.write(file, at: 9 * mib, pattern(100))
        #expect(try h.fs.seek(file, offset: 0, whence: seekData) == 8 * mib)
        #expect(try h.fs.seek(file, offset: 8 * mib, whence: seekHole) == 10 * mib)
    }

    @Test func seekOnACloneCountsTheParentsData() throws {
        let h = try harness("base", size: 64 * mib)
        let base = try h.path("images", "base")
        let writer = try h.fs.open(base, flags: O_RDWR)
        _ = try h.write(writer, at: 9 * mib, pattern(4096))
        try h.fsync(writer)
        h.fs.release(writer)
        _ = try h.fs.link(base, newParent: try h.path("images"), newName: "base@s")
        _ = try h.fs.link(try h.path("images", "base@s"), newParent: try h.path("vms"), newName: "clone")

        let file = try h.fs.open(try h.path("vms", "clone"), flags: O_RDWR)
        defer { h.fs.release(file) }
        #expect(try h.fs.seek(file, offset: 0, whence: seekData) == 8 * mib)
        #expect(try h.fs.seek(file, offset: 8 * mib, whence: seekHole) == 12 * mib)
        expectErrno(.noSuchAddressOrDevice) { _ = try h.fs.seek(file, offset: 12 * mib, whence: seekData) }
        _ = try h.write(file, at: 40 * mib, pattern(10))
        #expect(try h.fs.seek(file, offset: 12 * mib, whence: seekData) == 40 * mib)

        let snap = try h.fs.open(try h.path("images", "base@s"), flags: O_RDONLY)
        defer { h.fs.release(snap) }
        #expect(try h.fs.seek(snap, offset: 0, whence: seekData) == 8 * mib)
        expectErrno(.noSuchAddressOrDevice) { _ = try h.fs.seek(snap, offset: 12 * mib, whence: seekData) }
    }

    // MARK: - Zero-skipping

    @Test func zerosIntoNeverWrittenObjectsOfANewImageAreNotSent() throws {
        let h = try Harness()
        let spec = ImageSpec(pool: "images", name: "new")
        let (entry, file) = try h.fs.create(parent: try h.path("images"), name: "new", flags: O_WRONLY | O_CREAT)
        h.store.resetCallCounts()
        let data = pattern(Int(mib))
        #expect(try h.write(file, at: 0, zeros(2 * mib)) == Int(2 * mib))
        #expect(h.store.callCount("rbd_aio_write") == 0, "2 MiB of zeros into a new image were sent")
        #expect(try h.write(file, at: 2 * mib, data) == data.count)
        #expect(h.store.callCount("rbd_aio_write") == 1)
        try h.fsync(file)
        h.fs.release(file)
        #expect(h.store.rawObjectCount(of: spec) == 1)
        #expect(try h.store.openImage(spec, snapshot: nil, readOnly: true).size() == 3 * mib)
        let reader = try h.fs.open(entry.inode, flags: O_RDONLY)
        defer { h.fs.release(reader) }
        #expect(try h.read(reader, at: 0, count: Int(3 * mib)) == zeros(2 * mib) + data)
    }

    @Test func anImportOfMostlyZerosLeavesAThinImage() throws {
        let h = try Harness()
        let spec = ImageSpec(pool: "images", name: "disk.raw")
        let (_, file) = try h.fs.create(parent: try h.path("images"), name: "disk.raw", flags: O_WRONLY | O_CREAT)
        h.store.resetCallCounts()
        // 64 MiB of zeros in 1 MiB requests, as cp sends them, then 1 MiB of data.
        for index in 0..<64 { _ = try h.write(file, at: UInt64(index) * mib, zeros(mib)) }
        let data = pattern(Int(mib))
        _ = try h.write(file, at: 64 * mib, data)
        try h.fsync(file)
        h.fs.release(file)
        #expect(h.store.callCount("rbd_aio_write") == 1)
        #expect(h.store.rawObjectCount(of: spec) == 1)
        let image = try h.store.openImage(spec, snapshot: nil, readOnly: true)
        defer { image.close() }
        #expect(try image.size() == 65 * mib)
        #expect(try image.usedBytes() <= 4 * mib)
        #expect(try image.allocatedExtents(in: 0..<65 * mib) == [64 * mib..<65 * mib])
    }

    @Test func zerosOverWrittenDataAreSent() throws {
        let h = try Harness()
        let (entry, file) = try h.fs.create(parent: try h.path("images"), name: "new", flags: O_RDWR | O_CREAT)
        defer { h.fs.release(file) }
        _ = try h.write(file, at: 0, pattern(Int(2 * mib)))
        h.store.resetCallCounts()
        // Object 0 holds data now: zeros over it must reach the image.
        _ = try h.write(file, at: mib, zeros(mib))
        #expect(h.store.callCount("rbd_aio_write") == 1)
        #expect(try h.read(file, at: 0, count: Int(2 * mib)) == Array(pattern(Int(2 * mib))[0..<Int(mib)]) + zeros(mib))
        #expect(try h.fs.getattr(entry.inode).size == 2 * mib)
    }

    @Test func zerosIntoAnImageTheMountDidNotCreateAreSent() throws {
        let h = try harness("old", size: 16 * mib)
        let file = try h.fs.open(try h.path("images", "old"), flags: O_RDWR)
        defer { h.fs.release(file) }
        h.store.resetCallCounts()
        _ = try h.write(file, at: 0, zeros(4 * mib))
        #expect(h.store.callCount("rbd_aio_write") == 1, "rbdfs cannot know what an image it did not create holds")
        #expect(try h.read(file, at: 0, count: Int(4 * mib)) == zeros(4 * mib))
    }

    @Test func zerosIntoACloneMaskTheParentsData() throws {
        let data = pattern(Int(8 * mib))
        let h = try harness("base", size: 8 * mib, data: data)
        let base = try h.path("images", "base")
        _ = try h.fs.link(base, newParent: try h.path("images"), newName: "base@s")
        _ = try h.fs.link(try h.path("images", "base@s"), newParent: try h.path("vms"), newName: "clone")
        let file = try h.fs.open(try h.path("vms", "clone"), flags: O_RDWR)
        defer { h.fs.release(file) }
        h.store.resetCallCounts()
        _ = try h.write(file, at: 0, zeros(4 * mib))
        #expect(h.store.callCount("rbd_aio_write") == 1)
        #expect(try h.read(file, at: 0, count: Int(8 * mib)) == zeros(4 * mib) + Array(data[Int(4 * mib)...]))
    }

    @Test func aGlanceUploadOfMostlyZerosIsThin() throws {
        let h = try Harness()
        let spec = ImageSpec(pool: "images", name: "cirros")
        let (_, file) = try h.fs.create(parent: try h.path("images"), name: "cirros@snap", flags: O_WRONLY | O_CREAT)
        h.store.resetCallCounts()
        _ = try h.write(file, at: 0, zeros(8 * mib))
        _ = try h.write(file, at: 8 * mib, pattern(4096))
        let closed = Outcome<Void>()
        h.fs.flush(file) { closed.set($0) }
        try closed.wait()
        h.fs.release(file)
        #expect(h.store.callCount("rbd_aio_write") == 1)
        let snap = try h.store.openImage(spec, snapshot: "snap", readOnly: true)
        defer { snap.close() }
        #expect(try snap.size() == 8 * mib + 4096)
        #expect(try snap.allocatedExtents(in: 0..<8 * mib + 4096) == [8 * mib..<8 * mib + 4096])
        #expect(h.store.rawObjectCount(of: spec) == 1)
    }

    // MARK: - st_blocks and statfs

    @Test func stBlocksAreTheBytesTheImageUses() throws {
        var options = FSOptions()
        options.metadataTTL = .zero
        let h = try harness(size: 64 * mib, options: options)
        let inode = try h.path("images", "disk")
        #expect(try h.fs.getattr(inode).blocks == 0)
        let file = try h.fs.open(inode, flags: O_RDWR)
        _ = try h.write(file, at: 0, pattern(4096))
        _ = try h.write(file, at: 22 * mib, pattern(Int(3 * mib)))  // objects 5 and 6
        try h.fsync(file)
        #expect(try h.fs.getattr(inode).blocks == 12 * mib / 512)
        h.fs.release(file)
        let used = try h.store.openImage(ImageSpec(pool: "images", name: "disk"), snapshot: nil, readOnly: true).usedBytes()
        #expect(used == 12 * mib)
        #expect(try h.fs.getattr(inode).blocks == used / 512)
        #expect(try h.fs.lookup(parent: try h.path("images"), name: "disk").attributes.blocks == used / 512)
        #expect(try h.fs.getattr(inode).size == 64 * mib)

        // A snapshot: the objects it holds. A fresh clone of it: nothing of its own.
        _ = try h.fs.link(inode, newParent: try h.path("images"), newName: "disk@s")
        #expect(try h.fs.getattr(try h.path("images", "disk@s")).blocks == 12 * mib / 512)
        _ = try h.fs.link(try h.path("images", "disk@s"), newParent: try h.path("vms"), newName: "clone")
        let clone = try h.path("vms", "clone")
        #expect(try h.fs.getattr(clone).blocks == 0)
        let writer = try h.fs.open(clone, flags: O_RDWR)
        _ = try h.write(writer, at: 40 * mib, pattern(10))
        try h.fsync(writer)
        h.fs.release(writer)
        #expect(try h.fs.getattr(clone).blocks == 4 * mib / 512)
        #expect(try h.fs.getattr(try h.path("images")).blocks == 0)
    }

    @Test func statfsReportsTheClusterAndThePool() throws {
        let h = try Harness()
        let root = try h.fs.statfs(InodeTable.rootInode)
        #expect(root.totalBlocks * root.blockSize == MemoryStore.defaultCapacity)
        #expect(root.freeBlocks == root.totalBlocks && root.availableBlocks == root.totalBlocks)

        let (_, file) = try h.fs.create(parent: try h.path("images"), name: "disk", flags: O_WRONLY | O_CREAT)
        _ = try h.write(file, at: 0, pattern(Int(4 * mib)))
        try h.fsync(file)
        h.fs.release(file)
        let after = try h.fs.statfs(InodeTable.rootInode)
        #expect((after.totalBlocks - after.freeBlocks) * after.blockSize == 4 * mib)
        let images = try h.fs.statfs(try h.path("images"))
        #expect(images.totalBlocks > 0)
        #expect((images.totalBlocks - images.freeBlocks) * images.blockSize == 4 * mib)
        let vms = try h.fs.statfs(try h.path("vms"))
        #expect(vms.totalBlocks > 0 && vms.totalBlocks == vms.freeBlocks, "nothing stored in vms")
    }
}

extension Harness {
    fileprivate func fallocate(_ handle: UInt64, mode: Int32, offset: UInt64, length: UInt64) throws {
        let outcome = Outcome<Void>()
        fs.fallocate(handle, mode: mode, offset: offset, length: length) { outcome.set($0) }
        try outcome.wait()
    }
}
