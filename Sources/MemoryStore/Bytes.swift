import Foundation

// Raw-memory helpers for object data. The data path moves megabytes per call, and element-wise Array code
// (append(contentsOf:), replaceSubrange, allSatisfy) runs a hundred times slower in the unoptimised builds
// tests use; memcpy / memset / memcmp do not care.

/// `count` zero bytes.
func zeroedBytes(_ count: Int) -> [UInt8] {
    [UInt8](unsafeUninitializedCapacity: count) { buffer, initializedCount in
        if count > 0 { memset(buffer.baseAddress!, 0, count) }
        initializedCount = count
    }
}

/// A copy of `source`.
func copiedBytes(_ source: UnsafeRawBufferPointer) -> [UInt8] {
    [UInt8](unsafeUninitializedCapacity: source.count) { buffer, initializedCount in
        if source.count > 0 { memcpy(buffer.baseAddress!, source.baseAddress!, source.count) }
        initializedCount = source.count
    }
}

/// Writes `source` at `offset`, growing `bytes` with zeros first if it is shorter.
func store(_ source: UnsafeRawBufferPointer, into bytes: inout [UInt8], at offset: Int) {
    let end = offset + source.count
    if bytes.count < end {
        let old = bytes
        bytes = [UInt8](unsafeUninitializedCapacity: end) { buffer, initializedCount in
            old.withUnsafeBytes { if !$0.isEmpty { memcpy(buffer.baseAddress!, $0.baseAddress!, $0.count) } }
            memset(buffer.baseAddress! + old.count, 0, end - old.count)
            initializedCount = end
        }
    }
    guard !source.isEmpty else { return }
    bytes.withUnsafeMutableBytes { _ = memcpy($0.baseAddress! + offset, source.baseAddress!, source.count) }
}

/// Zeroes `range` of `bytes` (which must lie inside it).
func fillZeros(_ bytes: inout [UInt8], in range: Range<Int>) {
    guard !range.isEmpty else { return }
    bytes.withUnsafeMutableBytes { _ = memset($0.baseAddress! + range.lowerBound, 0, range.count) }
}

/// Cuts `bytes` to its first `count` bytes.
func truncate(_ bytes: inout [UInt8], to count: Int) {
    guard count < bytes.count else { return }
    let old = bytes
    bytes = [UInt8](unsafeUninitializedCapacity: count) { buffer, initializedCount in
        old.withUnsafeBytes { if count > 0 { memcpy(buffer.baseAddress!, $0.baseAddress!, count) } }
        initializedCount = count
    }
}

func isAllZero(_ bytes: [UInt8]) -> Bool {
    bytes.withUnsafeBytes { buffer in
        guard let base = buffer.baseAddress, buffer.count > 0 else { return true }
        // Zero iff the first byte is zero and every byte equals the one before it.
        return base.load(as: UInt8.self) == 0 && memcmp(base, base + 1, buffer.count - 1) == 0
    }
}

/// Copies an object's bytes from `start` into `destination`; bytes past the object's length read as zeros.
func copy(_ bytes: [UInt8], from start: Int, into destination: UnsafeMutableRawBufferPointer) {
    let available = max(0, min(destination.count, bytes.count - start))
    if available > 0 {
        bytes.withUnsafeBytes { _ = memcpy(destination.baseAddress!, $0.baseAddress! + start, available) }
    }
    zero(UnsafeMutableRawBufferPointer(rebasing: destination[available...]))
}

func zero(_ buffer: UnsafeMutableRawBufferPointer) {
    guard let base = buffer.baseAddress, buffer.count > 0 else { return }
    memset(base, 0, buffer.count)
}
