import Foundation
import Testing

/// The real local cluster and the rbdfs binary the integration tests run against (set by scripts/test).
enum Environment {
    static let cephConf = ProcessInfo.processInfo.environment["RBDFS_TEST_CEPH_CONF"]
    static let binary = ProcessInfo.processInfo.environment["RBDFS_BIN"]
    static let isReady = cephConf != nil && binary != nil

    static let skipReason: Comment = "RBDFS_TEST_CEPH_CONF and RBDFS_BIN not set: skipping integration tests (run scripts/test)"

    static func printSkipReasonOnce() {
        if !isReady { _ = printedReason }
    }

    private static let printedReason: Void = {
        print("SKIP integration tests: RBDFS_TEST_CEPH_CONF and RBDFS_BIN are not set; run scripts/test to start a local cluster")
    }()
}

/// A finished command.
struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
    var succeeded: Bool { status == 0 }
}

struct CommandFailed: Error, CustomStringConvertible {
    var command: String
    var result: CommandResult
    var description: String { "`\(command)` exited \(result.status): \(result.stderr)\(result.stdout)" }
}

/// Runs a shell command with the test cluster's CEPH_CONF; returns its status and output.
@discardableResult
func run(_ command: String, timeout: Double = 120) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/bash")
    process.arguments = ["-c", "timeout \(Int(timeout)) bash -c \(shellQuote(command))"]
    var environment = ProcessInfo.processInfo.environment
    if let conf = Environment.cephConf { environment["CEPH_CONF"] = conf }
    process.environment = environment
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    // Read both pipes while the command runs so a large output cannot fill one and stall it.
    let group = DispatchGroup()
    var outData = Data(), errData = Data()
    DispatchQueue.global().async(group: group) { outData = out.fileHandleForReading.readDataToEndOfFile() }
    DispatchQueue.global().async(group: group) { errData = err.fileHandleForReading.readDataToEndOfFile() }
    process.waitUntilExit()
    group.wait()
    return CommandResult(status: process.terminationStatus,
                         stdout: String(decoding: outData, as: UTF8.self),
                         stderr: String(decoding: errData, as: UTF8.self))
}

/// Runs a command that must succeed; returns its stdout.
@discardableResult
func sh(_ command: String, timeout: Double = 120) throws -> String {
    let result = try run(command, timeout: timeout)
    guard result.succeeded else { throw CommandFailed(command: command, result: result) }
    return result.stdout
}

func shellQuote(_ text: String) -> String { "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'" }

/// A unique name for this test's images, so tests can share pools and run in parallel.
func uniqueName(_ prefix: String) -> String {
    "\(prefix)-\(UUID().uuidString.prefix(8).lowercased())"
}

/// A live rbdfs mount of the test cluster in a fresh directory; unmounted when released.
final class MountedRBDFS {
    let path: String
    let logFile: String

    init(_ extraArguments: [String] = []) throws {
        path = NSTemporaryDirectory() + "rbdfs-test-" + UUID().uuidString.prefix(8)
        logFile = path + ".log"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        let arguments = ["mount", path, "--conf", Environment.cephConf!, "--log-file", logFile, "--log-level", "debug"] + extraArguments
        try sh(([Environment.binary!] + arguments).map(shellQuote).joined(separator: " "), timeout: 60)
    }

    /// `path/relative`, quoted for a shell.
    func q(_ relative: String) -> String { shellQuote(path + "/" + relative) }

    func unmount() {
        _ = try? run("\(shellQuote(Environment.binary!)) unmount \(shellQuote(path))", timeout: 30)
        // The daemon exits once the session ends; give it a moment so the next mount starts clean.
        for _ in 0..<50 where isMounted { usleep(100_000) }
    }

    var isMounted: Bool {
        ((try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? "").contains(" \(path) ")
    }

    deinit {
        unmount()
        try? FileManager.default.removeItem(atPath: path)
    }
}

/// Polls `condition` every 100 ms for up to `seconds`.
func eventually(within seconds: Double, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    repeat {
        if try condition() { return true }
        usleep(100_000)
    } while Date() < deadline
    return false
}
