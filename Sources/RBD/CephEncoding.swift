/// A reply that does not decode as expected: too short, a structure newer than this reader understands, or
/// a value out of range. Callers treat it as "don't know" and ask librbd instead.
struct CephDecodingError: Error, CustomStringConvertible {
    var description: String
}

/// Reads Ceph's wire encoding (`src/include/encoding.h`), as the OSD object classes answer in it:
/// little-endian integers, a string or byte list as a u32 length then the bytes, and a versioned
/// structure as a u8 version, a u8 oldest compatible version and a u32 length, then its fields.
/// Every read is bounds-checked: a short or malformed reply throws, it never traps.
struct CephDecoder {
    private let bytes: [UInt8]
    private var position: Int
    /// Where the structure being read ends (a nested structure ends before the whole buffer).
    private var end: Int

    init(_ bytes: [UInt8]) {
        self.bytes = bytes
        position = 0
        end = bytes.count
    }

    var isAtEnd: Bool { position == end }

    private mutating func take(_ count: Int, _ what: String) throws -> Range<Int> {
        guard count >= 0, end - position >= count else {
            throw CephDecodingError(description: "\(what): needs \(count) bytes, \(end - position) left")
        }
        defer { position += count }
        return position..<position + count
    }

    private mutating func integer<T: FixedWidthInteger>(_: T.Type, _ what: String) throws -> T {
        let range = try take(MemoryLayout<T>.size, what)
        var value: T = 0
        for index in range.reversed() {
            value = value << 8 | T(truncatingIfNeeded: bytes[index])
        }
        return value
    }

    mutating func u8(_ what: String = "u8") throws -> UInt8 { try integer(UInt8.self, what) }
    mutating func u32(_ what: String = "u32") throws -> UInt32 { try integer(UInt32.self, what) }
    mutating func u64(_ what: String = "u64") throws -> UInt64 { try integer(UInt64.self, what) }
    mutating func i64(_ what: String = "i64") throws -> Int64 { try integer(Int64.self, what) }

    /// A reply that is one u64 (a copy of the decoder reads it, so a temporary can be asked).
    func u64Value(_ what: String = "u64") throws -> UInt64 {
        var copy = self
        return try copy.u64(what)
    }

    mutating func bool(_ what: String = "bool") throws -> Bool {
        switch try u8(what) {
        case 0: return false
        case 1: return true
        case let other: throw CephDecodingError(description: "\(what): \(other) is not a bool")
        }
    }

    /// `count` bytes as they are.
    mutating func raw(_ count: UInt64, _ what: String) throws -> ArraySlice<UInt8> {
        guard count <= UInt64(Int.max) else {
            throw CephDecodingError(description: "\(what): \(count) bytes")
        }
        return bytes[try take(Int(count), what)]
    }

    /// A u32 length then that many bytes.
    mutating func byteList(_ what: String = "bytes") throws -> ArraySlice<UInt8> {
        let count = try u32("\(what) length")
        return bytes[try take(Int(count), what)]
    }

    /// A u32 length then UTF-8 bytes (Ceph does not check them; neither does this, as librbd does not).
    mutating func string(_ what: String = "string") throws -> String {
        String(decoding: try byteList(what), as: UTF8.self)
    }

    /// `utime_t`: u32 seconds, u32 nanoseconds.
    mutating func time(_ what: String = "time") throws -> (seconds: UInt32, nanoseconds: UInt32) {
        (try u32("\(what) seconds"), try u32("\(what) nanoseconds"))
    }

    /// `std::optional<T>`: a u8 "present" then the value if present.
    mutating func optional<T>(_ what: String, _ value: (inout CephDecoder) throws -> T) throws -> T? {
        try bool("\(what) present") ? try value(&self) : nil
    }

    /// A u32 count then that many elements.
    mutating func array<T>(_ what: String, _ element: (inout CephDecoder) throws -> T) throws -> [T] {
        let count = Int(try u32("\(what) count"))
        // Each element takes at least one byte: a count larger than what is left is malformed, and must not
        // make this reserve memory for it.
        guard count <= end - position else {
            throw CephDecodingError(description: "\(what): \(count) elements in \(end - position) bytes")
        }
        var elements: [T] = []
        elements.reserveCapacity(count)
        for _ in 0..<count {
            elements.append(try element(&self))
        }
        return elements
    }

    /// A versioned structure (`ENCODE_START(version, compat, bl)`): `body` reads the fields this reader
    /// knows of, given the version found; fields a newer encoder appended are skipped. Throws if the
    /// structure says it cannot be read by anything older than `known`.
    mutating func structure<T>(
        _ what: String, known: UInt8, _ body: (inout CephDecoder, _ version: UInt8) throws -> T
    ) throws -> T {
        let version = try u8("\(what) version")
        let compat = try u8("\(what) compat")
        let length = Int(try u32("\(what) length"))
        guard compat <= known else {
            throw CephDecodingError(description: "\(what): needs a reader of version \(compat), this is \(known)")
        }
        let range = try take(length, what)
        var inner = self
        inner.position = range.lowerBound
        inner.end = range.upperBound
        return try body(&inner, version)
    }
}

/// Writes the inputs of object class methods, in Ceph's wire encoding.
struct CephEncoder {
    private(set) var bytes: [UInt8] = []

    private mutating func integer<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    mutating func u64(_ value: UInt64) { integer(value) }
    mutating func i64(_ value: Int64) { integer(value) }

    mutating func bool(_ value: Bool) { bytes.append(value ? 1 : 0) }

    mutating func string(_ value: String) {
        let utf8 = Array(value.utf8)
        integer(UInt32(utf8.count))
        bytes.append(contentsOf: utf8)
    }

    static func encoding(_ body: (inout CephEncoder) -> Void) -> [UInt8] {
        var encoder = CephEncoder()
        body(&encoder)
        return encoder.bytes
    }
}
