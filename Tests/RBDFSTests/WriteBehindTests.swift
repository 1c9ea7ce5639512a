import Foundation
import MemoryStore
@testable import RBDFS
import Storage
import SystemPackage
import Testing

/// Records which operations of an `InFlightIO` have started, and finishes them on demand.
private final class Starts: @unchecked Sendable {
    private let lock = NSLock()
    private var started: [String] = []
    private var dones: [String: InFlightIO.Done] = [:]

    func submit(_ io: InFlightIO, _ name: String, _ range: Range<UInt64>, _ kind: InFlightIO.Kind, bytes: Int = 0) {
        io.submit(range, kind: kind, bytes: bytes) { done in
            self.lock.withLock {
                self.started.append(name)
                self.dones[name] = done
            }
        }
    }

    var names: [String] { lock.withLock { started } }

    func finish(_ name: String) {
        let done = lock.withLock { dones.removeValue(forKey: name) }
        done!()
    }
}

@Suite struct InFlightIOTests {
    @Test func overlappingWritesStartInOrder() {
        let io = InFlightIO(), starts = Starts()
        starts.submit(io, "a", 0..<100, .write, bytes: 100)
        starts.submit(io, "b", 50..<150, .write, bytes: 100)
        #expect(starts.names == ["a"])
        starts.finish("a")
        #expect(starts.names == ["a", "b"])
        starts.finish("b")
        #expect(io.isIdle)
    }

    @Test func disjointWritesRunTogether() {
        let io = InFlightIO(), starts = Starts()
        starts.submit(io, "a", 0..<100, .write, bytes: 100)
        starts.submit(io, "b", 100..<200, .write, bytes: 100)
        #expect(starts.names == ["a", "b"])
    }

    @Test func readWaitsForAnOverlappingWriteOnly() {
        let io = InFlightIO(), starts = Starts()
        starts.submit(io, "w", 0..<100, .write, bytes: 100)
        starts.submit(io, "r1", 90..<200, .read)
        starts.submit(io, "r2", 100..<200, .read)
        #expect(starts.names == ["w", "r2"])
        starts.finish("w")
        #expect(starts.names == ["w", "r2", "r1"])
    }

    @Test func aWriteWaitsForAnOverlappingRead() {
        let io = InFlightIO(), starts = Starts()
        starts.submit(io, "r", 0..<100, .read)
        starts.submit(io, "w", 50..<60, .write, bytes: 10)
        #expect(starts.names == ["r"])
        starts.finish("r")
        #expect(starts.names == ["r", "w"])
    }

    @Test func writesBeyondTheBudgetWaitInOrder() {
        let io = InFlightIO(byteBudget: 250, writeBudget: 8), starts = Starts()
        starts.submit(io, "a", 0..<100, .write, bytes: 100)
        starts.submit(io, "b", 100..<200, .write, bytes: 100)
        starts.submit(io, "c", 200..<300, .write, bytes: 100)
        starts.submit(io, "d", 300..<310, .write, bytes: 10)
        // d would fit, but writes never pass an earlier write.
        #expect(starts.names == ["a", "b"])
        starts.finish("b")
        #expect(starts.names == ["a", "b", "c", "d"])
    }

    @Test func oneWriteLargerThanTheBudgetStillRunsAlone() {
        let io = InFlightIO(byteBudget: 10, writeBudget: 1), starts = Starts()
        starts.submit(io, "big", 0..<100, .write, bytes: 100)
        starts.submit(io, "next", 100..<110, .write, bytes: 10)
        #expect(starts.names == ["big"])
        starts.finish("big")
        #expect(starts.names == ["big", "next"])
    }

    @Test func barrierWaitsForEverythingBeforeAndHoldsEverythingAfter() {
        let io = InFlightIO(), starts = Starts()
        starts.submit(io, "w", 0..<10, .write, bytes: 10)
        starts.submit(io, "r", 500..<600, .read)
        starts.submit(io, "flush", 0..<UInt64.max, .barrier)
        starts.submit(io, "later", 1000..<1010, .read)
        #expect(starts.names == ["w", "r"])
        starts.finish("w")
        #expect(starts.names == ["w", "r"])
        starts.finish("r")
        #expect(starts.names == ["w", "r", "flush"])
        starts.finish("flush")
        #expect(starts.names == ["w", "r", "flush", "later"])
    }

    @Test func waitForEarlierReturnsOnceEarlierWritesAreDone() async {
        let io = InFlightIO(), starts = Starts()
        starts.submit(io, "w", 0..<10, .write, bytes: 10)
        let waited = LockedBox(false)
        let thread = Thread {
            io.waitForEarlier()
            waited.value = true
        }
        thread.start()
        try? await Task.sleep(for: .milliseconds(100))
        #expect(!waited.value)
        starts.finish("w")
        for _ in 0..<100 where !waited.value { try? await Task.sleep(for: .milliseconds(10)) }
        #expect(waited.value)
        io.waitForEarlier()  // idle: returns at once
    }
}


/// Buffered writes through the filesystem: acknowledged early, failures kept for fsync.
@Suite struct WriteBehindTests {
    let mib: UInt64 = 1 << 20

    @Test func bufferedWriteFailureReachesTheNextFsyncOfEachOpenFileOnce() throws {
        let h = try Harness { store in
            try store.createImage(ImageSpec(pool: "images", name: "disk"), size: 8 * mib, options: .init())
        }
        let inode = try h.path("images", "disk")
        let writer = try h.fs.open(inode, flags: O_RDWR)
        let other = try h.fs.open(inode, flags: O_RDWR)
        h.store.injectFault(.ioError, operation: "rbd_aio_write")
        // Acknowledged: librbd has the data; the OSDs' answer comes later.
        #expect(try h.write(writer, at: 0, Array(repeating: 7, count: 4096), writeThrough: false) == 4096)
        expectErrno(.ioError) { try h.fsync(writer) }
        try h.fsync(writer)  // reported once
        expectErrno(.ioError) { try h.fsync(other) }
        // A file opened after the failure is not told of it.
        let later = try h.fs.open(inode, flags: O_RDWR)
        try h.fsync(later)
        for file in [writer, other, later] { h.fs.release(file) }
    }

    @Test func bufferedWritesReadBackAndReachTheStore() throws {
        let h = try Harness { store in
            try store.createImage(ImageSpec(pool: "images", name: "disk"), size: 8 * mib, options: .init())
        }
        let file = try h.fs.open(try h.path("images", "disk"), flags: O_RDWR)
        var expected = [UInt8](repeating: 0, count: Int(8 * mib))
        // Overlapping writes, each acknowledged early: the last one wins, as it was issued last.
        for round in 0..<64 {
            let offset = (round * 131_071) % Int(7 * mib)
            let bytes = [UInt8](repeating: UInt8(round + 1), count: 300_000)
            #expect(try h.write(file, at: UInt64(offset), bytes, writeThrough: false) == bytes.count)
            expected.replaceSubrange(offset..<offset + bytes.count, with: bytes)
        }
        #expect(try h.read(file, at: 0, count: Int(8 * mib)) == expected)
        try h.fsync(file)
        h.fs.release(file)
        var stored: [UInt8] = []
        try h.elsewhere(ImageSpec(pool: "images", name: "disk")) { stored = try read($0, count: Int(8 * mib)) }
        #expect(stored == expected)
    }

    @Test func aFailedBufferedWriteCancelsTheUploadSnapshot() throws {
        let h = try Harness()
        let pool = try h.path("images")
        let (_, file) = try h.fs.create(parent: pool, name: "img@snap", flags: O_WRONLY | O_CREAT)
        h.store.injectFault(.ioError, operation: "rbd_aio_write")
        _ = try h.write(file, at: 0, Array(repeating: 3, count: 8192), writeThrough: false)
        let outcome = Outcome<Void>()
        h.fs.flush(file) { outcome.set($0) }
        expectErrno(.ioError) { try outcome.wait() }
        h.fs.release(file)
        #expect(try h.store.openImage(ImageSpec(pool: "images", name: "img"), snapshot: nil, readOnly: true)
            .snapshots().isEmpty)
    }
}

/// What another client's writes do to zero-skipping and growth trimming (the exclusive lock tells).
@Suite struct AnotherWriterTests {
    let mib: UInt64 = 1 << 20

    @Test func zerosAreSentOnceAnotherClientHasWrittenTheImage() throws {
        let h = try Harness()
        let (_, file) = try h.fs.create(parent: try h.path("images"), name: "new", flags: O_RDWR | O_CREAT)
        _ = try h.write(file, at: 0, [UInt8](repeating: 1, count: 4096))
        try h.fsync(file)
        // Another client writes into an object this file never wrote (taking the exclusive lock).
        try h.elsewhere(ImageSpec(pool: "images", name: "new")) { other in
            try other.resize(to: 16 * mib)
            try write(other, at: 8 * mib, [UInt8](repeating: 9, count: 4096))
        }
        // Zeros over it must land, not be skipped as "never written".
        _ = try h.write(file, at: 8 * mib, [UInt8](repeating: 0, count: 4096))
        try h.fsync(file)
        #expect(try h.read(file, at: 8 * mib, count: 4096) == [UInt8](repeating: 0, count: 4096))
        h.fs.release(file)
    }

    @Test func zerosIntoAnotherClientsDataBeforeThisFileWroteAnythingLand() throws {
        let h = try Harness()
        let (_, file) = try h.fs.create(parent: try h.path("images"), name: "new", flags: O_RDWR | O_CREAT)
        try h.elsewhere(ImageSpec(pool: "images", name: "new")) { other in
            try other.resize(to: 16 * mib)
            try write(other, at: 4 * mib, [UInt8](repeating: 9, count: 4096))
        }
        _ = try h.write(file, at: 4 * mib, [UInt8](repeating: 0, count: 4096))
        try h.fsync(file)
        #expect(try h.read(file, at: 4 * mib, count: 4096) == [UInt8](repeating: 0, count: 4096))
        h.fs.release(file)
    }

    @Test func theGrowthStepIsKeptWhenAnotherClientTookTheLockMeanwhile() throws {
        let h = try Harness()
        let (_, file) = try h.fs.create(parent: try h.path("images"), name: "new", flags: O_RDWR | O_CREAT)
        _ = try h.write(file, at: 0, [UInt8](repeating: 1, count: Int(mib)))  // grows the image by a step
        let other = try h.store.openImage(ImageSpec(pool: "images", name: "new"), snapshot: nil, readOnly: false)
        let grown = try other.size()
        #expect(grown > mib)
        try write(other, at: 2 * mib, [UInt8](repeating: 9, count: 4096))
        try h.fsync(file)
        #expect(try other.size() == grown)
        other.close()
        h.fs.release(file)
    }
}
