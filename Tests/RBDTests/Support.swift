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

/// Runs the rbd CLI on the test cluster.
func rbd(_ arguments: String...) throws {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = ["rbd"] + (cephConf.map { ["--conf", $0] } ?? []) + arguments
    try process.run()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw StorageError(.ioError, operation: "rbd \(arguments.joined(separator: " "))",
                           target: "exit status \(process.terminationStatus)")
    }
}

/// Images a test made, removed (those in the trash first, then snapshots, clones before their parents) when
/// it ends, then the namespaces it made.
final class Cleanup: @unchecked Sendable {
    private var specs: [ImageSpec] = []
    private var namespaces: [(pool: String, name: String)] = []
    private var trashed: [(pool: String, id: String)] = []

    func add(_ spec: ImageSpec) { specs.append(spec) }

    /// An image moved to the trash, removed from there first (a clone there still holds its parent).
    func add(trashedID id: String, pool: String) { trashed.append((pool, id)) }

    func add(namespace: String, pool: String) { namespaces.append((pool, namespace)) }

    func removeAll() {
        for image in trashed {
            try? rbd("trash", "rm", "--pool", image.pool, image.id)
        }
        for spec in specs.reversed() {
            if let head = try? store.openImage(spec, snapshot: nil, readOnly: false) {
                for snapshot in (try? head.snapshots()) ?? [] {
                    if snapshot.isProtected { try? head.unprotectSnapshot(snapshot.name) }
                    try? head.removeSnapshot(snapshot.name)
                }
                head.close()
            }
            try? store.removeImage(spec)
        }
        for namespace in namespaces {
            try? store.removeNamespace(pool: namespace.pool, name: namespace.name)
        }
    }
}
