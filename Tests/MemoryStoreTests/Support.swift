import Foundation
import MemoryStore
import Storage
import SystemPackage
import Testing

let KiB: UInt64 = 1 << 10
let MiB: UInt64 = 1 << 20
let GiB: UInt64 = 1 << 30

/// Small objects keep the byte patterns of the tests readable: 4 KiB is librbd's smallest (order 12).
let smallObjects = ImageCreateOptions(objectSize: 4 * KiB)

/// A store whose I/O completes before the call returns: tests read as straight-line code.
func makeStore(capacity: UInt64 = MemoryStore.defaultCapacity,
               clock: @escaping @Sendable () -> Timestamp = MemoryStore.systemClock) -> MemoryStore {
    MemoryStore(capacity: capacity, completeSynchronously: true, clock: clock)
}

/// The error a call threw, or nil if it succeeded.
func failure(of body: () throws -> Void) -> StorageError? {
    do {
        try body()
        return nil
    } catch {
        return error as? StorageError
    }
}

func asyncFailure(of body: () async throws -> Void) async -> StorageError? {
    do {
        try await body()
        return nil
    } catch {
        return error as? StorageError
    }
}

/// `count` bytes counting up from `seed`, so misplaced bytes show.
func pattern(_ count: Int, seed: UInt8 = 1) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: Int(seed) &+ $0 % 251) }
}

func zeros(_ count: Int) -> [UInt8] {
    [UInt8](repeating: 0, count: count)
}

/// A clock tests move by hand.
final class ManualClock: @unchecked Sendable {
    private let lock = NSLock()
    private var seconds: Int64

    init(seconds: Int64 = 1_700_000_000) { self.seconds = seconds }

    func advance(by delta: Int64) {
        lock.lock(); defer { lock.unlock() }
        seconds += delta
    }

    var now: Timestamp {
        lock.lock(); defer { lock.unlock() }
        return Timestamp(seconds: seconds)
    }
}

// Async wrappers over the completion-based I/O: work the same whether the store completes inline or on
// its queues.
extension ImageHandle {
    func read(at offset: UInt64, count: Int) async throws -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 16)
        defer { buffer.deallocate() }
        let unchecked = UncheckedPointer(buffer: buffer)
        let length: Int = try await withCheckedThrowingContinuation { continuation in
            read(at: offset, into: unchecked.buffer) { continuation.resume(with: $0) }
        }
        return Array(buffer[..<length])
    }

    func write(at offset: UInt64, _ bytes: [UInt8]) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, Error>) in
            bytes.withUnsafeBytes { data in
                write(at: offset, from: data) { continuation.resume(with: $0) }
            }
        }
    }

    func discard(at offset: UInt64, length: UInt64) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, Error>) in
            discard(at: offset, length: length) { continuation.resume(with: $0) }
        }
    }

    func writeZeroes(at offset: UInt64, length: UInt64) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, Error>) in
            writeZeroes(at: offset, length: length) { continuation.resume(with: $0) }
        }
    }

    func flush() async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, Error>) in
            flush { continuation.resume(with: $0) }
        }
    }
}

struct UncheckedPointer: @unchecked Sendable {
    let buffer: UnsafeMutableRawBufferPointer
}

/// A value a completion hands over to the test.
final class AsyncBox<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value?

    func set(_ value: Value) {
        lock.lock(); defer { lock.unlock() }
        stored = value
    }

    var value: Value? {
        lock.lock(); defer { lock.unlock() }
        return stored
    }
}
