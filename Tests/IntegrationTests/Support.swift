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
///
/// posix_spawn and waitpid rather than Foundation's Process, and output to files rather than pipes:
/// `rbdfs mount` leaves a daemon behind that inherits whatever descriptors are open, and a pipe held by
/// a daemon never reaches end-of-file; tests run in parallel, so some other test's pipe would be open.
@discardableResult
func run(_ command: String, timeout: Double = 120) throws -> CommandResult {
    let base = NSTemporaryDirectory() + "rbdfs-cmd-" + UUID().uuidString
    let outPath = base + ".out", errPath = base + ".err"
    defer {
        unlink(outPath)
        unlink(errPath)
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    var environment = ProcessInfo.processInfo.environment
    if let conf = Environment.cephConf { environment["CEPH_CONF"] = conf }
    // The shell first closes every descriptor beyond 2 it inherited: another test's open file must not keep
    // a mount busy (Glibc does not export posix_spawn_file_actions_addclosefrom_np to Swift).
    let closeInherited = #"for f in /proc/$$/fd/*; do n=${f##*/}; [ "$n" -gt 2 ] && eval "exec $n>&-"; done; "#
    let arguments = ["/bin/bash", "-c", closeInherited + "timeout -k 5 \(Int(timeout)) bash -c \(shellQuote(command))"]
    var argv = arguments.map { strdup($0) } + [nil]
    var envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer {
        argv.forEach { free($0) }
        envp.forEach { free($0) }
    }
    var pid: pid_t = 0
    let spawned = posix_spawn(&pid, "/bin/bash", &actions, nil, &argv, &envp)
    guard spawned == 0 else { throw CommandFailed(command: command, result: CommandResult(status: -1, stdout: "", stderr: "posix_spawn: \(spawned)")) }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    let exited = status & 0x7f == 0
    return CommandResult(status: exited ? (status >> 8) & 0xff : 128 + (status & 0x7f),
                         stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
                         stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "")
}

/// Runs a command that must succeed; returns its stdout.
///
/// The `ceph` CLI of Pacific sometimes sends its first command before it knows the cluster's fsid and is
/// refused ("problem getting command descriptions from mon"); such a run is retried, a few times.
@discardableResult
func sh(_ command: String, timeout: Double = 120) throws -> String {
    var result = try run(command, timeout: timeout)
    for _ in 0..<4 where !result.succeeded && result.stderr.contains("problem getting command descriptions from mon") {
        usleep(200_000)
        result = try run(command, timeout: timeout)
    }
    guard result.succeeded else { throw CommandFailed(command: command, result: result) }
    return result.stdout
}

/// Creates an RBD pool of 8 PGs. Its `ceph` command keeps its stderr, which `sh` looks at to retry a refused
/// first command (a `2>&1 >/dev/null` there hid it, and one CI run failed on it).
func createRBDPool(_ pool: String) throws {
    try sh("ceph osd pool create \(shellQuote(pool)) 8 >/dev/null")
    try sh("rbd pool init \(shellQuote(pool))")
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
