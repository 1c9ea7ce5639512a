import Foundation
import Glibc
import Testing

// The random-operation checker (issue 6, item 2): thousands of random pwrite / pread / truncate / punch-hole /
// fsync / close-and-reopen operations on one image through the mount, from this test process with plain
// system calls, against an in-memory model of the file. Every read is compared with the model at once, and at
// the end `rbd export` and `rbd info` are compared with it byte for byte.
//
// Writes are up to 1.5 MiB at random offsets, biased to cross the 4 MiB object boundaries and to run past the
// end (which grows the image); some are all zeros or half zeros (the zero-skipping path of images created
// through the mount). Reads alternate between the writing descriptor (through the kernel's page cache) and a
// second O_DIRECT descriptor (straight to the daemon). Holes are punched at unaligned offsets, some over
// whole objects. Without --allow-shrink a shrink over data must fail with EPERM and change nothing, while
// punching the tail from an object boundary and then shrinking to it (empty space) must work; a variant
// mounted with --allow-shrink shrinks for real. The file stays under 40 MiB.
//
// Reproducing and soaking:
//
//   RBDFS_CHECK_SEED   the seed (decimal or 0x-hex); random when unset. Every run prints it, and a failure
//                      names the seed, the index and the exact operation that went wrong.
//   RBDFS_CHECK_OPS    operations per variant (default 8000: about 15-25 s each on 2 cores, the three
//                      variants running in parallel).
//
//   Replay a failure:  RBDFS_CHECK_SEED=<seed> RBDFS_CHECK_OPS=<index+1> swift test --filter <test name>
//   Soak:              RBDFS_CHECK_OPS=100000 swift test --filter RandomOperationTests   (repeat for new seeds)
//
// (Run with RBDFS_TEST_CEPH_CONF and RBDFS_BIN set, as scripts/test does.)

@Suite(.enabled(if: Environment.isReady, Environment.skipReason))
struct RandomOperationTests {
    init() { Environment.printSkipReasonOnce() }

    /// An image made through the mount (O_CREAT): rbdfs tracks its written objects and skips zero writes.
    @Test func randomOperationsOnAnImageCreatedThroughTheMountMatchTheModel() throws {
        let image = uniqueName("check-new")
        let mount = try MountedRBDFS()
        defer {
            mount.unmount()
            RBDCLI.purge(["images/\(image)"])
        }
        var checker = try RandomOperationChecker(
            name: "created through the mount", file: mount.path + "/images/\(image)", spec: "images/\(image)",
            mount: mount, allowShrink: false, create: true, initialSize: 24 << 20)
        try checker.run()
        mount.unmount()
        #expect(!mount.isMounted, "the mount is still busy after the checker closed its files: \(mount.path)")
    }

    /// An image made with `rbd create` (24 MiB, 4 MiB objects): no zero-skipping, librbd does everything.
    @Test func randomOperationsOnAnRbdCreatedImageMatchTheModel() throws {
        let image = uniqueName("check-rbd")
        try sh("rbd create images/\(image) --size 24M --object-size 4M")
        defer { RBDCLI.purge(["images/\(image)"]) }
        let mount = try MountedRBDFS()
        defer { mount.unmount() }
        var checker = try RandomOperationChecker(
            name: "rbd create", file: mount.path + "/images/\(image)", spec: "images/\(image)",
            mount: mount, allowShrink: false, create: false, initialSize: 24 << 20)
        try checker.run()
        mount.unmount()
        #expect(!mount.isMounted, "the mount is still busy after the checker closed its files: \(mount.path)")
    }

    /// A mount with --allow-shrink: shrinking truncates are part of the mix and must cut the data for real.
    @Test func randomOperationsWithShrinkingTruncatesOnAnAllowShrinkMountMatchTheModel() throws {
        let image = uniqueName("check-shrink")
        try sh("rbd create images/\(image) --size 24M --object-size 4M")
        defer { RBDCLI.purge(["images/\(image)"]) }
        let mount = try MountedRBDFS(["--allow-shrink"])
        defer { mount.unmount() }
        var checker = try RandomOperationChecker(
            name: "--allow-shrink", file: mount.path + "/images/\(image)", spec: "images/\(image)",
            mount: mount, allowShrink: true, create: false, initialSize: 24 << 20)
        try checker.run()
        mount.unmount()
        #expect(!mount.isMounted, "the mount is still busy after the checker closed its files: \(mount.path)")
    }
}

// MARK: - The checker

/// SplitMix64: tiny, fast, and the same sequence for a seed on every platform and Swift version.
struct SplitMix64 {
    private var state: UInt64

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// 0 ..< n (0 when n <= 0).
    mutating func below(_ n: Int) -> Int { n <= 0 ? 0 : Int(next() % UInt64(n)) }

    mutating func inRange(_ range: ClosedRange<Int>) -> Int { range.lowerBound + below(range.count) }

    mutating func percent(_ p: Int) -> Bool { below(100) < p }
}

/// What a write puts in the file.
enum WriteFill: String {
    case random, zeros, halfZeros = "half-zeros"
}

/// One operation, with everything needed to replay it.
enum CheckerOperation: CustomStringConvertible {
    case write(offset: Int, length: Int, fill: WriteFill, stamp: UInt64)
    case read(offset: Int, length: Int, direct: Bool)
    case truncate(to: Int, from: Int)
    case punchHole(offset: Int, length: Int)
    /// Punch the tail from an object boundary to the end, then shrink to that boundary: a shrink over empty
    /// space, which is allowed without --allow-shrink (and keeps the no-shrink variants growing for ever).
    case releaseTail(to: Int, from: Int)
    case fsync
    case fstat
    case reopen

    var description: String {
        switch self {
        case let .write(offset, length, fill, stamp):
            return "pwrite offset \(offset) length \(length) (\(fill.rawValue), stamp 0x\(String(stamp, radix: 16)))"
        case let .read(offset, length, direct):
            return "pread offset \(offset) length \(length)\(direct ? " (O_DIRECT descriptor)" : "")"
        case let .truncate(size, from):
            return "ftruncate to \(size) (\(size >= from ? "grow" : "shrink") from \(from))"
        case let .punchHole(offset, length):
            return "fallocate PUNCH_HOLE|KEEP_SIZE offset \(offset) length \(length)"
        case let .releaseTail(target, from):
            return "fallocate PUNCH_HOLE|KEEP_SIZE offset \(target) length \(from - target), then ftruncate to \(target)"
        case .fsync: return "fsync"
        case .fstat: return "fstat (st_size)"
        case .reopen: return "close and reopen"
        }
    }
}

struct CheckerFailure: Error, CustomStringConvertible {
    var description: String
}

/// Drives one image through random operations and checks it against a model.
struct RandomOperationChecker {
    static let objectSize = 4 << 20
    /// The file never grows past this (keeps the model and the export small).
    static let capacity = 40 << 20
    static let maxIO = 3 << 19  // 1.5 MiB

    let name: String
    let file: String
    let spec: String
    let mount: MountedRBDFS
    let allowShrink: Bool
    let seed: UInt64
    let operations: Int

    private var random: SplitMix64
    /// The model: bytes [0, size) are the file; [size, capacity) are always zero, so growing needs no work.
    private let model: UnsafeMutableRawBufferPointer
    private var size = 0
    private let buffer: UnsafeMutableRawBufferPointer
    private var fd: Int32 = -1
    private var directFD: Int32 = -1
    private var history: [String] = []
    private var counts: [String: Int] = [:]

    // Linux values the Glibc module does not export (they need _GNU_SOURCE).
    #if arch(x86_64)
    static let oDirect: Int32 = 0o40000
    #else
    static let oDirect: Int32 = 0o200000  // arm64, ppc64le, s390x
    #endif
    static let fallocPunchHole: Int32 = 0x02, fallocKeepSize: Int32 = 0x01

    // Every descriptor is O_CLOEXEC: tests run in parallel and spawn commands (posix_spawn, which closes
    // nothing), and a long-lived child of another test holding these would keep the mount busy at unmount.

    /// fallocate(2), looked up at run time: Glibc's module hides it behind _GNU_SOURCE.
    private typealias FallocateFunction = @convention(c) (Int32, Int32, Int64, Int64) -> Int32
    private static let fallocate: FallocateFunction = {
        guard let symbol = dlsym(nil, "fallocate") else { fatalError("fallocate not found in libc") }
        return unsafeBitCast(symbol, to: FallocateFunction.self)
    }()

    init(name: String, file: String, spec: String, mount: MountedRBDFS, allowShrink: Bool, create: Bool, initialSize: Int) throws {
        self.name = name
        self.file = file
        self.spec = spec
        self.mount = mount
        self.allowShrink = allowShrink
        let environment = ProcessInfo.processInfo.environment
        if let text = environment["RBDFS_CHECK_SEED"], !text.isEmpty {
            guard let parsed = text.hasPrefix("0x") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text) else {
                throw CheckerFailure(description: "RBDFS_CHECK_SEED=\(text) is not a number")
            }
            seed = parsed
        } else {
            seed = UInt64.random(in: 0...UInt64.max)
        }
        operations = environment["RBDFS_CHECK_OPS"].flatMap { Int($0) } ?? 8000
        random = SplitMix64(seed: seed)
        model = .allocate(byteCount: Self.capacity, alignment: 4096)
        model.initializeMemory(as: UInt8.self, repeating: 0)
        buffer = .allocate(byteCount: Self.maxIO + 4096, alignment: 4096)

        if create {
            fd = open(file, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw CheckerFailure(description: "open(O_CREAT) \(file): \(String(cString: strerror(errno)))") }
            guard ftruncate(fd, off_t(initialSize)) == 0 else {
                throw CheckerFailure(description: "ftruncate \(file) to \(initialSize): \(String(cString: strerror(errno)))")
            }
        } else {
            fd = open(file, O_RDWR | O_CLOEXEC)
            guard fd >= 0 else { throw CheckerFailure(description: "open \(file): \(String(cString: strerror(errno)))") }
        }
        size = initialSize
        directFD = open(file, O_RDONLY | O_CLOEXEC | Self.oDirect)
        if directFD < 0 {
            print("RandomOperationChecker: O_DIRECT open refused (\(String(cString: strerror(errno)))); all reads go through the page cache")
        }
    }

    /// Runs the operations, then compares `rbd export` and `rbd info` with the model. Records an issue (with
    /// the seed and the operation) and stops at the first mismatch.
    mutating func run() throws {
        defer {
            if fd >= 0 { close(fd) }
            if directFD >= 0 { close(directFD) }
            model.deallocate()
            buffer.deallocate()
        }
        print("RandomOperationChecker [\(name)]: seed \(seed) (0x\(String(seed, radix: 16))), \(operations) operations, \(spec)")
        let started = Date()
        for index in 0..<operations {
            let operation = nextOperation()
            history.append("#\(index) \(operation)")
            if history.count > 12 { history.removeFirst() }
            do {
                try perform(operation)
            } catch let failure as CheckerFailure {
                Issue.record(Comment(rawValue: report(failure.description, index: index, operation: operation)))
                return
            }
        }
        let ran = Date().timeIntervalSince(started)
        guard close(fd) == 0 else {
            let error = String(cString: strerror(errno))
            fd = -1
            Issue.record(Comment(rawValue: report("close failed: \(error)", index: operations, operation: .reopen)))
            return
        }
        fd = -1
        if directFD >= 0 {
            close(directFD)
            directFD = -1
        }
        // The cluster is the judge: size and every byte.
        var matches = true
        let rbdSize = try RBDCLI.size(spec)
        if rbdSize != UInt64(size) {
            matches = false
            Issue.record(Comment(rawValue: report("rbd info size \(rbdSize.map(String.init) ?? "?") != model size \(size)", index: operations, operation: nil)))
        }
        let exported = try RBDCLI.exportedBytes(spec)
        if let difference = firstDifference(exported, count: min(exported.count, size)) {
            matches = false
            Issue.record(Comment(rawValue: report("rbd export differs from the model at offset \(difference.offset): expected \(difference.expected), got \(difference.actual)", index: operations, operation: nil)))
        } else if exported.count != size {
            matches = false
            Issue.record(Comment(rawValue: report("rbd export has \(exported.count) bytes, the model \(size)", index: operations, operation: nil)))
        }
        let summary = counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        print("RandomOperationChecker [\(name)]: seed \(seed): \(operations) operations in \(String(format: "%.1f", ran)) s (\(summary)); final size \(size); rbd info and rbd export \(matches ? "match" : "DIFFER")")
    }

    // MARK: Choosing

    private mutating func nextOperation() -> CheckerOperation {
        let roll = random.below(100)
        switch roll {
        case 0..<36:
            let length = ioLength()
            let offset = min(interestingOffset(), Self.capacity - length)
            let fillRoll = random.below(10)
            let fill: WriteFill = fillRoll == 0 ? .zeros : fillRoll == 1 ? .halfZeros : .random
            return .write(offset: offset, length: length, fill: fill, stamp: random.next())
        case 36..<70:
            let offset = interestingOffset(), length = ioLength(), direct = random.percent(50)
            return .read(offset: offset, length: length, direct: direct && directFD >= 0)
        case 70..<80:
            // Lengths up to 9 MiB, so some holes cover whole objects; unaligned on purpose.
            let length = random.percent(50) ? random.inRange(1...65536) : random.inRange(1...(9 << 20))
            return .punchHole(offset: random.below(size + (1 << 20)), length: length)
        case 80..<85:
            return .truncate(to: min(size + random.inRange(1...(3 << 20)), Self.capacity), from: size)
        case 85..<(allowShrink ? 91 : 88):
            // A shrink: to anywhere below the size, biased to cut off a little.
            let target = random.percent(50) ? max(0, size - random.inRange(1...(2 << 20))) : random.below(size)
            return .truncate(to: target, from: size)
        case 91..<95, 88..<95:
            return .fsync
        case 95..<98:
            return .fstat
        case 98:
            let target = max(0, size - random.inRange(1...(16 << 20))) / Self.objectSize * Self.objectSize
            return .releaseTail(to: target, from: size)
        default:
            return .reopen
        }
    }

    /// An offset anywhere, near an object boundary, near the end (before or past it), or page-aligned.
    private mutating func interestingOffset() -> Int {
        switch random.below(20) {
        case 0..<8:
            return random.below(max(size, 1))
        case 8..<13:
            let boundary = random.inRange(1...(Self.capacity / Self.objectSize - 1)) * Self.objectSize
            return max(0, boundary + random.inRange(-8192...8192))
        case 13..<16:
            return max(0, size + random.inRange(-(2 << 20)...(2 << 20)))
        default:
            return random.below(max(size, 1)) / 4096 * 4096
        }
    }

    private mutating func ioLength() -> Int {
        switch random.below(10) {
        case 0..<3: return random.inRange(1...4096)
        case 3..<5: return random.inRange(1...(Self.maxIO / 4096)) * 4096
        default: return random.inRange(1...Self.maxIO)
        }
    }

    // MARK: Doing and checking

    private mutating func perform(_ operation: CheckerOperation) throws {
        switch operation {
        case let .write(offset, length, fill, stamp):
            counts["pwrite", default: 0] += 1
            Self.fill(buffer, length: length, fill: fill, stamp: stamp)
            let written = pwrite(fd, buffer.baseAddress, length, off_t(offset))
            guard written == length else { throw failure("pwrite returned \(written)", errno: written < 0 ? errno : 0) }
            memcpy(model.baseAddress! + offset, buffer.baseAddress!, length)
            size = max(size, offset + length)

        case let .read(offset, length, direct):
            counts[direct ? "pread O_DIRECT" : "pread", default: 0] += 1
            let expected = max(0, min(offset + length, size) - offset)
            let got = pread(direct ? directFD : fd, buffer.baseAddress, length, off_t(offset))
            guard got == expected else {
                throw failure("pread returned \(got), expected \(expected) (size \(size))", errno: got < 0 ? errno : 0)
            }
            if expected > 0, memcmp(buffer.baseAddress!, model.baseAddress! + offset, expected) != 0 {
                let read = UnsafeRawBufferPointer(rebasing: buffer[0..<expected])
                let at = (0..<expected).first { read[$0] != model[offset + $0] } ?? 0
                throw CheckerFailure(description: "read data differs from the model at file offset \(offset + at): expected \(model[offset + at]), got \(read[at])")
            }

        case let .truncate(target, from):
            let shrinking = target < from
            counts[shrinking ? "ftruncate shrink" : "ftruncate grow", default: 0] += 1
            let status = ftruncate(fd, off_t(target))
            let error = errno
            if shrinking && !allowShrink {
                // Data in the cut range: must be refused. Only zeros there: either outcome is right (the rule
                // is whether RBD objects hold data, which the model does not track), any other errno is not.
                let holdsData = lastNonZero(from: target, to: from) != nil
                if status == 0 {
                    guard !holdsData else { throw failure("a shrink over data succeeded without --allow-shrink", errno: 0) }
                    counts["ftruncate shrink accepted (zeros only)", default: 0] += 1
                    cut(to: target)
                } else {
                    guard error == EPERM else { throw failure("shrink refused with the wrong errno", errno: error) }
                    counts["ftruncate shrink refused (EPERM)", default: 0] += 1
                }
                try checkSize()
            } else {
                guard status == 0 else { throw failure("ftruncate failed", errno: error) }
                if shrinking { cut(to: target) } else { size = target }
            }

        case let .punchHole(offset, length):
            counts["punch hole", default: 0] += 1
            let status = Self.fallocate(fd, Self.fallocPunchHole | Self.fallocKeepSize, Int64(offset), Int64(length))
            guard status == 0 else { throw failure("fallocate failed", errno: errno) }
            let end = min(offset + length, size)
            if offset < end { memset(model.baseAddress! + offset, 0, end - offset) }

        case let .releaseTail(target, from):
            counts["release tail", default: 0] += 1
            if target < from {
                try perform(.punchHole(offset: target, length: from - target))
                let status = ftruncate(fd, off_t(target))
                let error = errno
                // Every object in the cut range was punched whole: nothing holds data there, so it must work.
                // (A size that ends inside an object leaves that object zeroed, not removed: then EPERM is
                // right too.)
                if status == 0 {
                    counts["release tail: shrank", default: 0] += 1
                    cut(to: target)
                } else if error == EPERM && from % Self.objectSize != 0 {
                    counts["release tail: EPERM (size inside an object)", default: 0] += 1
                } else {
                    throw failure("shrinking over a released tail failed", errno: error)
                }
                try checkSize()
            }

        case .fsync:
            counts["fsync", default: 0] += 1
            guard Glibc.fsync(fd) == 0 else { throw failure("fsync failed", errno: errno) }

        case .fstat:
            counts["fstat", default: 0] += 1
            try checkSize()

        case .reopen:
            counts["close+reopen", default: 0] += 1
            let status = close(fd)
            fd = -1
            guard status == 0 else { throw failure("close failed", errno: errno) }
            fd = open(file, O_RDWR | O_CLOEXEC)
            guard fd >= 0 else { throw failure("reopen failed", errno: errno) }
        }
    }

    private func checkSize() throws {
        var st = Glibc.stat()
        guard fstat(fd, &st) == 0 else { throw failure("fstat failed", errno: errno) }
        guard Int(st.st_size) == size else { throw CheckerFailure(description: "st_size \(st.st_size) != model size \(size)") }
    }

    /// Shrinks the model, keeping [size, capacity) zero.
    private mutating func cut(to target: Int) {
        if target < size { memset(model.baseAddress! + target, 0, size - target) }
        size = target
    }

    /// The last non-zero byte of the model in [from, to), scanning backwards a word at a time.
    private func lastNonZero(from: Int, to: Int) -> Int? {
        var end = to
        let base = model.baseAddress!
        while end > from {
            if end - from >= 8 && end % 8 == 0 {
                if base.load(fromByteOffset: end - 8, as: UInt64.self) != 0 {
                    return (from..<end).last { model[$0] != 0 }
                }
                end -= 8
            } else {
                if model[end - 1] != 0 { return end - 1 }
                end -= 1
            }
        }
        return nil
    }

    private func firstDifference(_ exported: [UInt8], count: Int) -> (offset: Int, expected: UInt8, actual: UInt8)? {
        let equal = exported.withUnsafeBytes { memcmp($0.baseAddress!, model.baseAddress!, count) == 0 }
        if equal || count == 0 { return nil }
        var low = 0
        var chunk = 1 << 20
        while chunk >= 1 {
            while low + chunk <= count,
                  exported.withUnsafeBytes({ memcmp($0.baseAddress! + low, model.baseAddress! + low, chunk) == 0 }) {
                low += chunk
            }
            chunk /= 2
        }
        return (low, model[low], exported[low])
    }

    /// Deterministic data for a write: a stream seeded by the operation's stamp (so a replay writes the same
    /// bytes, and bytes misplaced from another write never match).
    static func fill(_ buffer: UnsafeMutableRawBufferPointer, length: Int, fill: WriteFill, stamp: UInt64) {
        let base = buffer.baseAddress!
        if fill == .zeros {
            memset(base, 0, length)
            return
        }
        var generator = SplitMix64(seed: stamp)
        var offset = 0
        while offset < length {
            base.storeBytes(of: generator.next(), toByteOffset: offset, as: UInt64.self)
            offset += 8
        }
        if fill == .halfZeros { memset(base + length / 4, 0, length / 2) }
    }

    private func failure(_ what: String, errno code: Int32) -> CheckerFailure {
        CheckerFailure(description: code == 0 ? what : "\(what): errno \(code) (\(String(cString: strerror(code))))")
    }

    private func report(_ what: String, index: Int, operation: CheckerOperation?) -> String {
        let step = operation.map { "operation #\(index) of \(operations): \($0)" } ?? "after all \(operations) operations"
        return """
            random-operation checker [\(name)] MISMATCH on \(spec), seed \(seed) (0x\(String(seed, radix: 16))), \(step): \(what)
            model size \(size); last operations:
            \(history.joined(separator: "\n"))
            replay: RBDFS_CHECK_SEED=\(seed) RBDFS_CHECK_OPS=\(min(index + 1, operations)) (same test); daemon log: \(mount.logFile)
            """
    }
}
