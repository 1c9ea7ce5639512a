import Foundation
import Logging
import RBD
import Storage
import SystemPackage
import Testing

/// The `ceph.conf` of the local cluster the tests run against (`scripts/test` starts one and sets it).
let cephConf = ProcessInfo.processInfo.environment["RBDFS_TEST_CEPH_CONF"]

let skipWithoutCluster = Testing.ConditionTrait.enabled(
    if: cephConf != nil, "RBDFS_TEST_CEPH_CONF not set: skipping Ceph store tests; run scripts/test")

let testLogger = Logger(label: "rbdfs.tests")

/// One connection shared by every test, as one rbdfs mount shares one.
private let sharedStore = Result { try CephStore.connect(conf: cephConf, id: nil, keyring: nil, logger: testLogger) }

var store: CephStore {
    get throws { try sharedStore.get() }
}

/// A name no other test (or earlier run) uses: tests run in parallel on one cluster.
func uniqueName(_ purpose: String) -> String {
    "t-\(purpose)-\(UUID().uuidString.prefix(8).lowercased())"
}

let KiB: UInt64 = 1024
let MiB: UInt64 = 1024 * KiB
let GiB: UInt64 = 1024 * MiB

/// Bytes that differ from offset to offset, so a misplaced extent shows.
func pattern(count: Int, seed: UInt8) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 12) ^ seed }
}

/// Runs `body` and expects a `StorageError` carrying `errno`; returns it for further checks.
@discardableResult
func expectStorageError(
    _ errno: Errno, sourceLocation: SourceLocation = #_sourceLocation, _ body: () async throws -> Void
) async -> StorageError? {
    let error = await #expect(throws: StorageError.self, sourceLocation: sourceLocation) { try await body() }
    #expect(error?.errno == errno, "\(String(describing: error))", sourceLocation: sourceLocation)
    return error
}

/// The asynchronous I/O of a handle, awaited.
extension ImageHandle {
    func read(at offset: UInt64, count: Int) async throws -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
        defer { buffer.deallocate() }
        let done = try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Int, any Error>) in
            read(at: offset, into: buffer) { continuation.resume(with: $0) }
        }
        return Array(buffer.prefix(done))
    }

    func write(at offset: UInt64, _ bytes: [UInt8]) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            bytes.withUnsafeBytes { write(at: offset, from: $0) { continuation.resume(with: $0) } }
        }
    }

    func writeZeroes(at offset: UInt64, length: UInt64) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            writeZeroes(at: offset, length: length) { continuation.resume(with: $0) }
        }
    }

    func discard(at offset: UInt64, length: UInt64) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            discard(at: offset, length: length) { continuation.resume(with: $0) }
        }
    }

    func flush() async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            flush { continuation.resume(with: $0) }
        }
    }
}

/// A counter bumped from librbd's threads and read from a test.
final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0

    var value: Int { lock.withLock { count } }

    func increment() {
        lock.withLock { count += 1 }
    }

    /// Waits up to `seconds` for the count to reach `target`.
    func wait(for target: Int, seconds: Double) async throws -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while value < target && Date() < deadline {
            try await Task.sleep(nanoseconds: 50_000_000)
        }
        return value >= target
    }
}
