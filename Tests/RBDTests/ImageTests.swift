import Foundation
import RBD
import Storage
import SystemPackage
import Testing

@Suite(skipWithoutCluster) struct ImageTests {
    @Test func createsAndDescribesImages() throws {
        let plain = ImageSpec(pool: "images", name: uniqueName("plain"))
        let small = ImageSpec(pool: "images", name: uniqueName("small-objects"))
        let missing = uniqueName("missing")
        let before = Date()
        try store.createImage(plain, size: GiB, options: ImageCreateOptions())
        defer { try? store.removeImage(plain) }
        try store.createImage(small, size: 100 * MiB + 512, options: ImageCreateOptions(objectSize: MiB))
        defer { try? store.removeImage(small) }

        let names = try store.listImages(pool: "images", namespace: "")
        #expect(names.contains(plain.name) && names.contains(small.name))

        let summaries = try store.describeImages(
            pool: "images", namespace: "", names: [plain.name, small.name, missing])
        let plainInfo = try #require(try summaries[plain.name]?.get()).info
        #expect(plainInfo.size == GiB)
        #expect(plainInfo.objectSize == 4 * MiB && plainInfo.order == 22)
        #expect(plainInfo.format == 2)
        #expect(plainInfo.features & 1 != 0, "layering")
        #expect(plainInfo.parent == nil)
        #expect(abs(Double(plainInfo.createTime.seconds) - before.timeIntervalSince1970) < 120)
        #expect(plainInfo.blockNamePrefix == "rbd_data.\(plainInfo.id)")

        let smallSummary = try #require(try summaries[small.name]?.get())
        #expect(smallSummary.info.size == 100 * MiB + 512)
        #expect(smallSummary.info.objectSize == MiB && smallSummary.info.order == 20)
        #expect(smallSummary.snapshots == [])

        #expect(throws: StorageError(.noSuchFileOrDirectory, operation: "rbd_aio_open_read_only",
                                     target: "images/\(missing)")) { try summaries[missing]?.get() }

        let handle = try store.openImage(small, snapshot: nil, readOnly: false)
        defer { handle.close() }
        #expect(try handle.info() == smallSummary.info)
        #expect(try handle.size() == 100 * MiB + 512)
        #expect(!handle.isReadOnly && handle.snapshot == nil && handle.spec == small)
    }

    @Test func refusesAnObjectSizeThatIsNotAPowerOfTwo() async throws {
        let spec = ImageSpec(pool: "images", name: uniqueName("odd-objects"))
        let error = await expectStorageError(.invalidArgument) {
            try store.createImage(spec, size: GiB, options: ImageCreateOptions(objectSize: 3 * MiB))
        }
        #expect(error?.operation == "rbd_create4")
        #expect(try !store.listImages(pool: "images", namespace: "").contains(spec.name))
    }

    @Test func describesMoreImagesThanItOpensAtOnce() throws {
        let namespace = uniqueName("many")
        try store.createNamespace(pool: "images", name: namespace)
        defer { try? store.removeNamespace(pool: "images", name: namespace) }
        let names = (0..<80).map { "image-\($0)" }
        for (index, name) in names.enumerated() {
            try store.createImage(ImageSpec(pool: "images", namespace: namespace, name: name),
                                  size: UInt64(index + 1) * MiB, options: ImageCreateOptions())
        }
        defer {
            for name in names { try? store.removeImage(ImageSpec(pool: "images", namespace: namespace, name: name)) }
        }

        let listed = try store.listImages(pool: "images", namespace: namespace)
        #expect(Set(listed) == Set(names))
        let summaries = try store.describeImages(pool: "images", namespace: namespace, names: listed)
        #expect(summaries.count == 80)
        for (index, name) in names.enumerated() {
            #expect(try summaries[name]?.get().info.size == UInt64(index + 1) * MiB)
        }
    }

    @Test func roundTripsDataAcrossObjectBoundaries() async throws {
        let spec = ImageSpec(pool: "volumes", name: uniqueName("round-trip"))
        try store.createImage(spec, size: 16 * MiB, options: ImageCreateOptions(objectSize: MiB))
        defer { try? store.removeImage(spec) }
        let data = pattern(count: Int(6 * MiB), seed: 0x5a)
        let offset = MiB - 4096 + 17  // starts inside object 0, ends inside object 7

        let writer = try store.openImage(spec, snapshot: nil, readOnly: false)
        defer { writer.close() }
        try await writer.write(at: offset, data)
        try await writer.flush()
        #expect(try await writer.read(at: offset, count: data.count) == data)

        let reader = try store.openImage(spec, snapshot: nil, readOnly: true)
        defer { reader.close() }
        #expect(reader.isReadOnly)
        #expect(try await reader.read(at: offset, count: data.count) == data)
        #expect(try await reader.read(at: 0, count: Int(offset)) == [UInt8](repeating: 0, count: Int(offset)))
        await expectStorageError(.readOnlyFileSystem) { try await reader.write(at: 0, [1]) }
    }

    /// librbd's trap, which callers must clamp around: I/O that starts at or past the end is EINVAL, and a
    /// read that starts before the end is cut short at it.
    @Test func ioAtOrPastTheEndIsEINVAL() async throws {
        let spec = ImageSpec(pool: "volumes", name: uniqueName("end"))
        try store.createImage(spec, size: 4 * MiB, options: ImageCreateOptions())
        defer { try? store.removeImage(spec) }
        let handle = try store.openImage(spec, snapshot: nil, readOnly: false)
        defer { handle.close() }

        let readError = await expectStorageError(.invalidArgument) {
            _ = try await handle.read(at: 4 * MiB, count: 4096)
        }
        #expect(readError?.operation == "rbd_aio_read")
        #expect(readError?.target == spec.description)
        await expectStorageError(.invalidArgument) { try await handle.write(at: 4 * MiB, [1, 2, 3]) }
        await expectStorageError(.invalidArgument) { try await handle.write(at: 5 * MiB, [1, 2, 3]) }
        #expect(try await handle.read(at: 4 * MiB - 100, count: 4096).count == 100)
        #expect(try handle.size() == 4 * MiB, "a write never grows the image")
    }

    @Test func writeZeroesAndDiscardReadBackAsZeros() async throws {
        let spec = ImageSpec(pool: "volumes", name: uniqueName("zeroes"))
        try store.createImage(spec, size: 8 * MiB, options: ImageCreateOptions(objectSize: MiB))
        defer { try? store.removeImage(spec) }
        let handle = try store.openImage(spec, snapshot: nil, readOnly: false)
        defer { handle.close() }
        let ones = [UInt8](repeating: 0xff, count: Int(4 * MiB))
        try await handle.write(at: 0, ones)

        try await handle.writeZeroes(at: 4096, length: MiB + 4096)  // not object-aligned
        try await handle.discard(at: 3 * MiB, length: MiB)  // one whole object
        var expected = ones
        expected.replaceSubrange(4096..<Int(MiB + 8192), with: repeatElement(0, count: Int(MiB + 4096)))
        expected.replaceSubrange(Int(3 * MiB)..<Int(4 * MiB), with: repeatElement(0, count: Int(MiB)))
        #expect(try await handle.read(at: 0, count: expected.count) == expected)
        #expect(try handle.allocatedExtents(in: 0..<8 * MiB) == [0..<3 * MiB], "the discarded object is released")
    }

    @Test func allocationOfAThinImage() async throws {
        let spec = ImageSpec(pool: "images", name: uniqueName("thin"))
        try store.createImage(spec, size: GiB, options: ImageCreateOptions())
        defer { try? store.removeImage(spec) }
        let handle = try store.openImage(spec, snapshot: nil, readOnly: false)
        defer { handle.close() }
        #expect(try handle.allocatedExtents(in: 0..<GiB) == [])
        #expect(try handle.usedBytes() == 0)

        try await handle.write(at: 100 * MiB + 10, pattern(count: 4096, seed: 1))
        #expect(try handle.allocatedExtents(in: 0..<GiB) == [100 * MiB..<104 * MiB])
        #expect(try handle.usedBytes() == 4 * MiB)
        #expect(try handle.allocatedExtents(in: 101 * MiB..<102 * MiB) == [101 * MiB..<102 * MiB], "clipped")
        #expect(try handle.allocatedExtents(in: 0..<100 * MiB) == [])
        #expect(try handle.allocatedExtents(in: GiB..<2 * GiB) == [], "past the end")

        try await handle.write(at: 104 * MiB, [1])
        try await handle.write(at: 200 * MiB, [1])
        #expect(try handle.allocatedExtents(in: 0..<2 * GiB) == [100 * MiB..<108 * MiB, 200 * MiB..<204 * MiB])
        #expect(try handle.usedBytes() == 12 * MiB)
    }

    @Test func removingAnImageWithSnapshotsIsENOTEMPTY() async throws {
        let spec = ImageSpec(pool: "images", name: uniqueName("with-snap"))
        try store.createImage(spec, size: 4 * MiB, options: ImageCreateOptions())
        let handle = try store.openImage(spec, snapshot: nil, readOnly: false)
        try handle.createSnapshot("snap")
        handle.close()

        let error = await expectStorageError(.directoryNotEmpty) { try store.removeImage(spec) }
        #expect(error?.operation == "rbd_remove")
        #expect(try store.listImages(pool: "images", namespace: "").contains(spec.name))

        let again = try store.openImage(spec, snapshot: nil, readOnly: false)
        try again.removeSnapshot("snap")
        again.close()
        try store.removeImage(spec)
    }

    /// `rbd_open` registers a watch on the header, and librbd refuses to remove a watched image;
    /// `rbd_open_read_only` does not watch.
    @Test func removingAnOpenImageIsEBUSY() async throws {
        let spec = ImageSpec(pool: "images", name: uniqueName("open"))
        try store.createImage(spec, size: 4 * MiB, options: ImageCreateOptions())
        let writer = try store.openImage(spec, snapshot: nil, readOnly: false)
        await expectStorageError(.resourceBusy) { try store.removeImage(spec) }
        writer.close()
        writer.close()

        let reader = try store.openImage(spec, snapshot: nil, readOnly: true)
        defer { reader.close() }
        try store.removeImage(spec)
        #expect(try !store.listImages(pool: "images", namespace: "").contains(spec.name))
    }

    @Test func aHandleDroppedWithoutCloseIsClosedAnyway() async throws {
        let spec = ImageSpec(pool: "images", name: uniqueName("dropped"))
        try store.createImage(spec, size: 4 * MiB, options: ImageCreateOptions())
        defer { try? store.removeImage(spec) }
        do {
            let handle = try store.openImage(spec, snapshot: nil, readOnly: false)
            #expect(try handle.size() == 4 * MiB)
        }
        let deadline = Date().addingTimeInterval(10)
        while (try? store.removeImage(spec)) == nil && Date() < deadline {
            try await Task.sleep(nanoseconds: 100_000_000)
        }
        #expect(try !store.listImages(pool: "images", namespace: "").contains(spec.name), "its watch is gone")
    }

    @Test func renamesAnImage() async throws {
        let old = ImageSpec(pool: "images", name: uniqueName("old"))
        let new = ImageSpec(pool: "images", name: uniqueName("new"))
        try store.createImage(old, size: 4 * MiB, options: ImageCreateOptions())
        try store.renameImage(old, to: new.name)
        defer { try? store.removeImage(new) }
        let names = try store.listImages(pool: "images", namespace: "")
        #expect(names.contains(new.name) && !names.contains(old.name))
        await expectStorageError(.noSuchFileOrDirectory) { _ = try store.openImage(old, snapshot: nil, readOnly: true) }
        let renamed = try store.openImage(new, snapshot: nil, readOnly: true)
        defer { renamed.close() }
        #expect(try renamed.size() == 4 * MiB)
    }

    @Test func aWatchHearsAnotherClientResize() async throws {
        let spec = ImageSpec(pool: "images", name: uniqueName("watched"))
        try store.createImage(spec, size: 4 * MiB, options: ImageCreateOptions())
        defer { try? store.removeImage(spec) }
        let watched = try store.openImage(spec, snapshot: nil, readOnly: false)
        defer { watched.close() }
        let updates = Counter()
        try watched.watchUpdates { updates.increment() }

        let unwatched = try store.openImage(spec, snapshot: nil, readOnly: true)
        defer { unwatched.close() }

        let other = try store.openImage(spec, snapshot: nil, readOnly: false)
        try other.resize(to: 64 * MiB)
        other.close()
        #expect(try await updates.wait(for: 1, seconds: 10))
        #expect(try watched.size() == 64 * MiB)
        #expect(try watched.info().size == 64 * MiB)
        #expect(try unwatched.size() == 4 * MiB, "a read-only handle keeps what it loaded at open")

        try watched.resize(to: 2 * MiB)  // shrinks are allowed
        #expect(try watched.size() == 2 * MiB)
    }

    /// librbd 16.2 aborts the whole process (ceph_assert in DiffIterate) when asked to diff an empty range
    /// of an image with fast-diff: a 0-byte image (what `touch` or `cp` of an empty file makes) must still
    /// answer `du`, `ls -s` and SEEK_DATA.
    @Test func anEmptyImageUsesNothingAndHasNoExtents() async throws {
        let spec = ImageSpec(pool: "images", name: uniqueName("empty"))
        try store.createImage(spec, size: 0, options: ImageCreateOptions())
        defer { try? store.removeImage(spec) }
        let handle = try store.openImage(spec, snapshot: nil, readOnly: false)
        defer { handle.close() }
        #expect(try handle.info().features & (1 << 4) != 0, "fast-diff, the case librbd asserts on")
        #expect(try handle.usedBytes() == 0)
        #expect(try handle.allocatedExtents(in: 0..<GiB) == [])
        #expect(try handle.allocatedExtents(in: 0..<0) == [])

        let summary = try #require(store.describeImages(pool: "images", namespace: "", names: [spec.name])[spec.name]).get()
        #expect(summary.info.size == 0)
        #expect(summary.usedBytes == 0)

        try handle.createSnapshot("empty")
        defer { try? handle.removeSnapshot("empty") }
        let snapshot = try store.openImage(spec, snapshot: "empty", readOnly: true)
        defer { snapshot.close() }
        #expect(try snapshot.usedBytes() == 0)
        #expect(try snapshot.allocatedExtents(in: 0..<MiB) == [])
    }
}
