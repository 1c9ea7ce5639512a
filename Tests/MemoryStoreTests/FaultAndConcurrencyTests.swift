import Foundation
import MemoryStore
import Storage
import SystemPackage
import Testing

@Suite struct FaultInjectionTests {
    @Test func injectedWriteFaultsFailTheNextCallsOnly() async throws {
        let store = makeStore()
        let handle = try makeSmallImage(store)
        store.injectFault(.ioError, operation: "rbd_aio_write", count: 2)
        for _ in 0..<2 {
            #expect(await asyncFailure { try await handle.write(at: 0, [1]) }
                    == StorageError(.ioError, operation: "rbd_aio_write", target: "images/img"))
        }
        #expect(store.rawObjectCount(of: handle.spec) == 0)  // a failed write changes nothing
        try await handle.write(at: 0, [1])
        #expect(store.rawObjectCount(of: handle.spec) == 1)
        #expect(store.callCount("rbd_aio_write") == 3)
    }

    @Test func faultsCanTargetOneImage() async throws {
        let store = makeStore()
        let a = try makeSmallImage(store, name: "a")
        let b = try makeSmallImage(store, name: "b")
        store.injectFault(.noSpace, operation: "rbd_aio_flush", image: "b")
        try await a.flush()
        #expect(await asyncFailure { try await b.flush() }
                == StorageError(.noSpace, operation: "rbd_aio_flush", target: "images/b"))
        try await b.flush()

        store.injectFault(.ioError, operation: "rbd_aio_read", image: "images/a")
        #expect(await asyncFailure { _ = try await a.read(at: 0, count: 1) }?.errno == .ioError)
        _ = try await b.read(at: 0, count: 1)
    }

    @Test func openFaultsCoverReadOnlyOpens() throws {
        let store = makeStore()
        _ = try makeSmallImage(store)
        let spec = ImageSpec(pool: "images", name: "img")
        store.injectFault(.permissionDenied, operation: "rbd_open", count: 2)
        #expect(failure { _ = try store.openImage(spec, snapshot: nil, readOnly: false) }
                == StorageError(.permissionDenied, operation: "rbd_open", target: "images/img"))
        #expect(failure { _ = try store.openImage(spec, snapshot: nil, readOnly: true) }
                == StorageError(.permissionDenied, operation: "rbd_open_read_only", target: "images/img"))
        _ = try store.openImage(spec, snapshot: nil, readOnly: true)
    }

    @Test func synchronousCallsAndStoreCallsCanFailToo() throws {
        let store = makeStore()
        let handle = try makeSmallImage(store)
        store.injectFault(.ioError, operation: "rbd_resize2")
        #expect(failure { try handle.resize(to: 1) }
                == StorageError(.ioError, operation: "rbd_resize2", target: "images/img"))
        #expect(try handle.size() == 5 * 4096)
        store.injectFault(.timedOut, operation: "rbd_create4")
        #expect(failure { try store.createImage(ImageSpec(pool: "images", name: "x"), size: 1,
                                                options: ImageCreateOptions()) }?.errno == .timedOut)
        store.injectFault(.ioError, operation: "rbd_stat")
        #expect(failure { _ = try handle.info() }?.errno == .ioError)
        store.injectFault(.ioError, operation: "rados_pool_list")
        #expect(failure { _ = try store.listPools() }?.errno == .ioError)
    }

    @Test func clearFaultsAndCallCounts() async throws {
        let store = makeStore()
        let handle = try makeSmallImage(store)
        store.injectFault(.ioError, operation: "rbd_aio_flush", count: 100)
        store.clearFaults()
        try await handle.flush()
        try await handle.flush()
        #expect(store.callCounts["rbd_aio_flush"] == 2)
        #expect(store.callCounts["rbd_create4"] == 1)
        #expect(store.callCounts["rbd_open"] == 1)
        #expect(store.callCount("rbd_aio_write") == 0)
        store.resetCallCounts()
        #expect(store.callCounts.isEmpty)
        handle.close()
        #expect(store.callCount("rbd_close") == 1)
    }
}

@Suite struct AsynchronousTests {
    @Test func ioCompletesOnABackgroundQueueInIssueOrder() async throws {
        let store = MemoryStore()
        let handle = try makeSmallImage(store)
        // Hold the image's queue in a completion: a write issued meanwhile returns before it completes.
        let release = DispatchSemaphore(value: 0)
        handle.flush { _ in release.wait() }
        let written = AsyncBox<Bool>()
        [UInt8]([1]).withUnsafeBytes { data in
            handle.write(at: 0, from: data) { _ in written.set(true) }
        }
        #expect(written.value == nil)
        release.signal()
        // Many writes in flight; the flush issued after them completes after them.
        for index in 0..<50 {
            [UInt8(index)].withUnsafeBytes { data in
                handle.write(at: UInt64(index) * 400, from: data) { result in #expect(throws: Never.self) { try result.get() } }
            }
        }
        try await handle.flush()
        #expect(written.value == true)
        let data = try await handle.read(at: 0, count: 50 * 400)
        #expect((0..<50).allSatisfy { data[$0 * 400] == UInt8($0) })
        handle.close()
    }

    @Test func completionsOfOneImageNeverOverlap() async throws {
        let store = MemoryStore()
        let first = try makeSmallImage(store)
        let second = try store.openImage(first.spec, snapshot: nil, readOnly: true)
        let tracker = OverlapTracker()
        await withTaskGroup(of: Void.self) { group in
            for index in 0..<200 {
                let handle = index % 2 == 0 ? first : second
                group.addTask {
                    await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 1)
                        let pointer = UncheckedPointer(buffer: buffer)
                        handle.read(at: UInt64(index), into: buffer) { _ in
                            tracker.enter()
                            usleep(50)
                            tracker.leave()
                            pointer.buffer.deallocate()
                            continuation.resume()
                        }
                    }
                }
            }
        }
        #expect(tracker.maximum == 1)
        first.close()
        second.close()
    }

    @Test func closeWaitsForInFlightIO() throws {
        let store = MemoryStore()
        let handle = try makeSmallImage(store)
        let done = AsyncBox<Bool>()
        handle.flush { _ in
            usleep(20_000)
            done.set(true)
        }
        handle.close()
        #expect(done.value == true)
        #expect(store.openHandleCount(of: handle.spec) == 0)
    }
}

@Suite struct WatchTests {
    @Test func otherHandlesHearOfSizeAndSnapshotChanges() async throws {
        let store = makeStore()
        let writer = try makeSmallImage(store)
        let watcher = try store.openImage(writer.spec, snapshot: nil, readOnly: true)
        let heardByWatcher = Counter()
        let heardByWriter = Counter()
        try watcher.watchUpdates { heardByWatcher.increment() }
        try writer.watchUpdates { heardByWriter.increment() }

        try writer.resize(to: 8192)
        #expect(try watcher.size() == 8192)
        try writer.createSnapshot("s")
        try writer.protectSnapshot("s")
        try store.cloneImage(parent: writer.spec, snapshot: "s", child: ImageSpec(pool: "vms", name: "c"),
                             options: ImageCreateOptions())
        try await writer.write(at: 0, [1])  // data is not the header: no notification
        #expect(heardByWatcher.value == 4)
        #expect(heardByWriter.value == 1)  // only the clone, made through the store
        watcher.close()
        try writer.resize(to: 4096)
        #expect(heardByWatcher.value == 4)
    }

    @Test func readOnlyHandlesHearTheirImageGo() throws {
        let store = makeStore()
        let writer = try makeSmallImage(store)
        writer.close()
        let reader = try store.openImage(writer.spec, snapshot: nil, readOnly: true)
        let heard = Counter()
        try reader.watchUpdates { heard.increment() }
        try store.removeImage(writer.spec)
        #expect(heard.value == 1)
        #expect(failure { _ = try reader.info() }?.errno == .noSuchFileOrDirectory)
    }

    @Test func asynchronousStoresNotifyOnABackgroundQueue() throws {
        let store = MemoryStore()
        let writer = try makeSmallImage(store)
        let watcher = try store.openImage(writer.spec, snapshot: nil, readOnly: true)
        let heard = Counter()
        try watcher.watchUpdates { heard.increment() }
        try writer.createSnapshot("s")
        store.waitForCompletions()
        #expect(heard.value == 1)
        writer.close()
        watcher.close()
    }
}

@Suite struct StatsTests {
    @Test func statsCountObjectsOncePerVersion() async throws {
        let store = makeStore(capacity: GiB)
        let handle = try makeSmallImage(store)
        try await handle.write(at: 0, [UInt8](repeating: 1, count: 8192))
        try handle.createSnapshot("s")
        var stats = try store.clusterStats()
        #expect(stats.usedBytes == 8192 && stats.objects == 2)  // the snapshot shares both objects
        #expect(stats.totalBytes == GiB && stats.availableBytes == GiB - 8192)

        try await handle.write(at: 0, [2])  // copy-on-write: object 0 now exists twice
        stats = try store.clusterStats()
        #expect(stats.usedBytes == 3 * 4096 && stats.objects == 3)
        #expect(try store.poolStats(pool: "images").usedBytes == 3 * 4096)
        #expect(try store.poolStats(pool: "vms").usedBytes == 0)
        #expect(failure { _ = try store.poolStats(pool: "nope") }?.errno == .noSuchFileOrDirectory)
    }
}

/// Counts how many completions run at once.
final class OverlapTracker: @unchecked Sendable {
    private let lock = NSLock()
    private var current = 0
    private(set) var maximum = 0

    func enter() {
        lock.lock(); defer { lock.unlock() }
        current += 1
        maximum = max(maximum, current)
    }

    func leave() {
        lock.lock(); defer { lock.unlock() }
        current -= 1
    }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0

    func increment() {
        lock.lock(); defer { lock.unlock() }
        count += 1
    }

    var value: Int {
        lock.lock(); defer { lock.unlock() }
        return count
    }
}
