import MemoryStore
import Storage
import SystemPackage
import Testing

/// A 5-object image of 4 KiB objects, opened read-write.
func makeSmallImage(_ store: MemoryStore, name: String = "img", size: UInt64 = 5 * 4 * KiB) throws -> any ImageHandle {
    let spec = ImageSpec(pool: "images", name: name)
    try store.createImage(spec, size: size, options: smallObjects)
    return try store.openImage(spec, snapshot: nil, readOnly: false)
}

@Suite struct ReadWriteTests {
    @Test func writesRoundTripAcrossObjectBoundaries() async throws {
        let store = makeStore()
        let handle = try makeSmallImage(store)
        let data = pattern(10_000, seed: 7)
        try await handle.write(at: 3_000, data)  // objects 0...3
        #expect(try await handle.read(at: 3_000, count: 10_000) == data)
        #expect(try await handle.read(at: 0, count: 3_000) == zeros(3_000))
        #expect(try await handle.read(at: 2_990, count: 20) == zeros(10) + data[..<10])
        #expect(store.rawObjectCount(of: handle.spec) == 4)

        // Overwriting inside an object keeps its neighbours.
        try await handle.write(at: 4_096, [0xAA, 0xBB])
        let around = try await handle.read(at: 4_094, count: 6)
        #expect(around == [data[1_094], data[1_095], 0xAA, 0xBB, data[1_098], data[1_099]])
    }

    @Test func thinImageCostsNothing() async throws {
        let store = makeStore()
        let spec = ImageSpec(pool: "images", name: "big")
        try store.createImage(spec, size: 10 * GiB, options: ImageCreateOptions())
        let handle = try store.openImage(spec, snapshot: nil, readOnly: false)
        #expect(try handle.usedBytes() == 0)
        #expect(try handle.allocatedExtents(in: 0..<(10 * GiB)) == [])
        #expect(try await handle.read(at: 9 * GiB, count: 4096) == zeros(4096))
        #expect(store.rawObjectCount(of: spec) == 0)
        #expect(try store.clusterStats().usedBytes == 0)

        try await handle.write(at: 5 * GiB + 10, [1])
        #expect(store.rawObjectCount(of: spec) == 1)
        #expect(try handle.usedBytes() == 4 * MiB)
        #expect(try handle.allocatedExtents(in: 0..<(10 * GiB)) == [(5 * GiB)..<(5 * GiB + 4 * MiB)])
        // RADOS stores what was written, not the whole object.
        #expect(try store.clusterStats().usedBytes == 11)
        #expect(try store.clusterStats().objects == 1)
    }

    @Test func endOfImageRulesFollowClipIO() async throws {
        let store = makeStore()
        let handle = try makeSmallImage(store, size: 10_000)

        // Starting at or past the end: EINVAL (the filesystem must clamp).
        #expect(await asyncFailure { _ = try await handle.read(at: 10_000, count: 1) }
                == StorageError(.invalidArgument, operation: "rbd_aio_read", target: "images/img"))
        #expect(await asyncFailure { try await handle.write(at: 10_000, [1]) }
                == StorageError(.invalidArgument, operation: "rbd_aio_write", target: "images/img"))
        #expect(await asyncFailure { try await handle.write(at: 20_000, [1]) }?.errno == .invalidArgument)
        #expect(await asyncFailure { try await handle.discard(at: 10_000, length: 1) }?.errno == .invalidArgument)
        #expect(await asyncFailure { try await handle.writeZeroes(at: 10_001, length: 1) }?.errno == .invalidArgument)

        // Zero-length requests are always fine.
        #expect(try await handle.read(at: 50_000, count: 0) == [])
        try await handle.write(at: 50_000, [])

        // Crossing the end: clipped, and never grows the image.
        try await handle.write(at: 9_998, [1, 2, 3, 4])
        #expect(try handle.size() == 10_000)
        #expect(try await handle.read(at: 9_996, count: 100) == [0, 0, 1, 2])
        #expect(try handle.allocatedExtents(in: 0..<UInt64.max) == [8_192..<10_000])
    }

    @Test func readOnlyAndSnapshotHandlesRefuseChanges() async throws {
        let store = makeStore()
        let writer = try makeSmallImage(store)
        try writer.createSnapshot("s")
        let reader = try store.openImage(writer.spec, snapshot: nil, readOnly: true)
        let snapshot = try store.openImage(writer.spec, snapshot: "s", readOnly: false)
        #expect(snapshot.isReadOnly && snapshot.snapshot == "s")

        for handle in [reader, snapshot] {
            let target = handle.spec.describing(snapshot: handle.snapshot)
            #expect(await asyncFailure { try await handle.write(at: 0, [1]) }
                    == StorageError(.readOnlyFileSystem, operation: "rbd_aio_write", target: target))
            #expect(await asyncFailure { try await handle.discard(at: 0, length: 4096) }?.errno == .readOnlyFileSystem)
            #expect(await asyncFailure { try await handle.writeZeroes(at: 0, length: 1) }?.errno == .readOnlyFileSystem)
            #expect(failure { try handle.resize(to: 1) }
                    == StorageError(.readOnlyFileSystem, operation: "rbd_resize2", target: target))
            #expect(failure { try handle.createSnapshot("t") }?.errno == .readOnlyFileSystem)
            #expect(failure { try handle.protectSnapshot("s") }?.errno == .readOnlyFileSystem)
            #expect(failure { try handle.removeSnapshot("s") }?.errno == .readOnlyFileSystem)
            #expect(failure { try handle.flatten(progress: nil) }?.errno == .readOnlyFileSystem)
            try await handle.flush()
        }
    }

    @Test func writeCopiesTheCallersBufferBeforeReturning() async throws {
        let store = MemoryStore()  // asynchronous: the write runs after write(...) returns
        let handle = try makeSmallImage(store)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4, alignment: 1)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: [1, 2, 3, 4])
        let written = AsyncBox<Result<Void, StorageError>>()
        handle.write(at: 0, from: UnsafeRawBufferPointer(buffer)) { written.set($0) }
        buffer.copyBytes(from: [9, 9, 9, 9])  // reused at once, as FUSE does with its request buffer
        try await handle.flush()
        try written.value!.get()
        #expect(try await handle.read(at: 0, count: 4) == [1, 2, 3, 4])
        handle.close()
    }

    @Test func timesComeFromTheImage() async throws {
        let clock = ManualClock()
        let store = makeStore(clock: { clock.now })
        let handle = try makeSmallImage(store)
        let created = clock.now
        clock.advance(by: 10)
        _ = try await handle.read(at: 0, count: 1)
        #expect(try handle.info().accessTime == clock.now)
        #expect(try handle.info().modifyTime == created)
        clock.advance(by: 10)
        try await handle.write(at: 0, [1])
        let info = try handle.info()
        #expect(info.modifyTime == clock.now && info.createTime == created)
    }
}

@Suite struct DiscardAndZeroTests {
    /// Fills every byte of the 5 objects of a small image with non-zero data.
    func filledImage(_ store: MemoryStore) async throws -> any ImageHandle {
        let handle = try makeSmallImage(store)
        try await handle.write(at: 0, [UInt8](repeating: 0xEE, count: 5 * 4096))
        return handle
    }

    @Test func discardReleasesWholeObjectsOnly() async throws {
        let store = makeStore()
        let handle = try await filledImage(store)
        // 2048 ..< 10340 covers object 1 whole, half of object 0 and 100 bytes of object 2.
        try await handle.discard(at: 2_048, length: 8_292)
        #expect(store.rawObjectCount(of: handle.spec) == 4)
        #expect(try await handle.read(at: 0, count: 4096) == [UInt8](repeating: 0xEE, count: 4096))
        #expect(try await handle.read(at: 4096, count: 4096) == zeros(4096))
        #expect(try await handle.read(at: 8192, count: 4096) == [UInt8](repeating: 0xEE, count: 4096))
        #expect(try handle.allocatedExtents(in: 0..<(5 * 4096)) == [0..<4096, 8192..<(5 * 4096)])
        #expect(try handle.usedBytes() == 4 * 4096)
    }

    @Test func writeZeroesZeroesTheRangeAndReleasesWholeObjects() async throws {
        let store = makeStore()
        let handle = try await filledImage(store)
        try await handle.writeZeroes(at: 2_048, length: 8_292)
        #expect(store.rawObjectCount(of: handle.spec) == 4)
        let all = try await handle.read(at: 0, count: 5 * 4096)
        #expect(Array(all[..<2_048]) == [UInt8](repeating: 0xEE, count: 2_048))
        #expect(Array(all[2_048..<10_340]) == zeros(8_292))
        #expect(Array(all[10_340...]) == [UInt8](repeating: 0xEE, count: 5 * 4096 - 10_340))
    }

    @Test func rangesReachingTheImageEndReleaseTheLastPartialObject() async throws {
        let store = makeStore()
        let handle = try makeSmallImage(store, size: 10_000)  // objects 0, 1 and 1808 bytes of 2
        try await handle.write(at: 0, [UInt8](repeating: 0xEE, count: 10_000))
        try await handle.discard(at: 8_192, length: 1 << 20)
        #expect(store.rawObjectCount(of: handle.spec) == 2)
        try await handle.writeZeroes(at: 4_000, length: 6_000)
        #expect(store.rawObjectCount(of: handle.spec) == 1)
        #expect(try await handle.read(at: 3_999, count: 2) == [0xEE, 0])
    }

    @Test func holesNeverWrittenStayUnallocated() async throws {
        let store = makeStore()
        let handle = try makeSmallImage(store)
        try await handle.writeZeroes(at: 100, length: 10)
        try await handle.discard(at: 0, length: 5 * 4096)
        #expect(store.rawObjectCount(of: handle.spec) == 0)
    }
}

@Suite struct ExtentTests {
    @Test func allocatedExtentsMergeAdjacentObjectsAndClipToTheRange() async throws {
        let store = makeStore()
        let handle = try makeSmallImage(store, size: 10 * 4096 + 100)
        try await handle.write(at: 4096 + 5, [1])
        try await handle.write(at: 2 * 4096, [1])
        try await handle.write(at: 5 * 4096, [1])
        try await handle.write(at: 10 * 4096 + 50, [1])
        let objects: UInt64 = 4096
        let end = 10 * objects + 100
        let expected: [Range<UInt64>] = [objects..<(3 * objects), (5 * objects)..<(6 * objects), (10 * objects)..<end]
        #expect(try handle.allocatedExtents(in: 0..<end) == expected)
        let clippedExpected: [Range<UInt64>] = [5_000..<(3 * objects), (5 * objects)..<(5 * objects + 10)]
        #expect(try handle.allocatedExtents(in: 5_000..<(5 * objects + 10)) == clippedExpected)
        #expect(try handle.allocatedExtents(in: (6 * 4096)..<(10 * 4096)) == [])
        // rbd du counts the last object only up to the image end.
        #expect(try handle.usedBytes() == 3 * 4096 + 100)  // objects 1, 2, 5 and the 100 bytes of 10
    }

    @Test func resizeShrinksAwayDataAndGrowsWithZeros() async throws {
        let store = makeStore()
        let handle = try makeSmallImage(store)
        try await handle.write(at: 0, [UInt8](repeating: 0xEE, count: 5 * 4096))
        try handle.resize(to: 6_000)
        #expect(try handle.size() == 6_000)
        #expect(store.rawObjectCount(of: handle.spec) == 2)
        try handle.resize(to: 5 * 4096)
        let all = try await handle.read(at: 0, count: 5 * 4096)
        #expect(Array(all[..<6_000]) == [UInt8](repeating: 0xEE, count: 6_000))
        #expect(Array(all[6_000...]) == zeros(5 * 4096 - 6_000))
    }
}
