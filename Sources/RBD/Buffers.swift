import Foundation

/// Calls a librados/librbd function that fills a caller's array and answers `-ERANGE` when the array is
/// too small (most write back the count they need through `count`; the rest get a doubled array).
/// `body` gets the final return value, the zero-initialised array and `count` as the call left it.
func withFilledArray<Element, Result>(
    of _: Element.Type, count initialCount: Int,
    _ fill: (UnsafeMutablePointer<Element>, inout Int) -> Int32,
    _ body: (Int32, UnsafeMutablePointer<Element>, Int) throws -> Result
) rethrows -> Result {
    var capacity = max(initialCount, 1)
    while true {
        let byteCount = capacity * MemoryLayout<Element>.stride
        let memory = UnsafeMutableRawPointer.allocate(
            byteCount: byteCount, alignment: MemoryLayout<Element>.alignment)
        defer { memory.deallocate() }
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: byteCount)
        let elements = memory.bindMemory(to: Element.self, capacity: capacity)
        var count = capacity
        let code = fill(elements, &count)
        if code == -ERANGE {
            capacity = max(count, capacity * 2)
            continue
        }
        return try body(code, elements, count)
    }
}

/// Reads a string that a librbd getter writes into a caller's buffer (`rbd_get_id`, ...).
func stringFilled(
    _ operation: String, _ target: String, _ fill: (UnsafeMutablePointer<CChar>, Int) -> Int32
) throws -> String {
    try withFilledArray(of: CChar.self, count: 64, { buffer, count in fill(buffer, count) }) { code, buffer, _ in
        try check(code, operation, target)
        return String(cString: buffer)
    }
}

/// Splits a buffer of NUL-terminated strings laid one after another, as librados and librbd list names.
func nulSeparatedStrings(_ buffer: UnsafePointer<CChar>, byteCount: Int) -> [String] {
    UnsafeBufferPointer(start: buffer, count: byteCount)
        .split(separator: 0)
        .map { String(decoding: $0.lazy.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
}

/// A string librbd allocated (and will free), or "" for NULL.
func string(_ pointer: UnsafePointer<CChar>?) -> String {
    pointer.map { String(cString: $0) } ?? ""
}
