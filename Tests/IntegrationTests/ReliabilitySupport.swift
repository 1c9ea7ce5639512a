import Foundation
import Testing

// Helpers shared by the reliability suites (DurabilityTests, RandomOperationTests, FioVerifyTests,
// BadInputTests): the rbd CLI as the judge of what the cluster holds, the daemon behind a mount, and raw
// errnos from Python. Names are distinct from the file-private helpers of other suites on purpose.

/// A scratch directory for one test's files, removed when released.
final class ReliabilityScratch {
    let path: String

    init(_ name: String) throws {
        path = NSTemporaryDirectory() + "rbdfs-rel-" + name
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    /// `path/name`, unquoted.
    func file(_ name: String) -> String { path + "/" + name }

    /// `path/name`, quoted for a shell.
    func q(_ name: String) -> String { shellQuote(file(name)) }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// The `rbd` CLI, for what the cluster really holds.
enum RBDCLI {
    /// `rbd info --format json SPEC` as a dictionary.
    static func info(_ spec: String) throws -> [String: Any] {
        let json = try sh("rbd info --format json \(shellQuote(spec))")
        return (try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]) ?? [:]
    }

    /// The image's size in bytes, from `rbd info`.
    static func size(_ spec: String) throws -> UInt64? {
        switch try info(spec)["size"] {
        case let number as NSNumber: return number.uint64Value
        case let text as String: return UInt64(text)
        default: return nil
        }
    }

    /// `rbd ls POOL[/NS]`.
    static func list(_ directory: String) throws -> [String] {
        try sh("rbd ls \(shellQuote(directory))").split(separator: "\n").map(String.init)
    }

    /// Snapshot names with their protection, `rbd snap ls --format json`: ["name": "true"/"false"].
    static func snapshots(_ spec: String) throws -> [String: String] {
        let json = try sh("rbd snap ls --format json \(shellQuote(spec))")
        let list = (try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]]) ?? []
        var result: [String: String] = [:]
        for snapshot in list {
            if let name = snapshot["name"] as? String { result[name] = snapshot["protected"] as? String ?? "?" }
        }
        return result
    }

    /// `rbd children POOL/IMAGE@SNAP`.
    static func children(_ spec: String) throws -> [String] {
        try sh("rbd children \(shellQuote(spec))").split(separator: "\n").map { String($0).trimmed }.filter { !$0.isEmpty }.sorted()
    }

    /// `rbd export SPEC` into `file`.
    static func export(_ spec: String, to file: String) throws {
        try sh("rbd export --no-progress \(shellQuote(spec)) \(shellQuote(file))", timeout: 300)
    }

    /// The exported bytes of SPEC.
    static func exportedBytes(_ spec: String) throws -> [UInt8] {
        let file = NSTemporaryDirectory() + "rbdfs-rel-export-" + UUID().uuidString.prefix(8)
        defer { unlink(file) }
        try export(spec, to: file)
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
    }

    /// True when `rbd export SPEC` is byte-identical to `file`; prints the first difference otherwise.
    static func exportEquals(_ spec: String, _ file: String) throws -> Bool {
        let exported = file + ".export-" + UUID().uuidString.prefix(8)
        defer { unlink(exported) }
        try export(spec, to: exported)
        let result = try run("cmp \(shellQuote(file)) \(shellQuote(exported))")
        if !result.succeeded { print("rbd export \(spec) differs from \(file): \(result.stdout)\(result.stderr)") }
        return result.succeeded
    }

    /// Removes the images in order (children before parents), each with all its snapshots (unprotected
    /// first). A dead client's watch (a killed daemon) would make `rbd rm` wait for the watch timeout, so
    /// watchers are blocklisted first, as an operator would after a client crash.
    static func purge(_ specs: [String]) {
        let script = #"""
            purge() {
                rbd info "$1" >/dev/null 2>&1 || return 0
                for w in $(rbd status --format json "$1" 2>/dev/null | python3 -c "import json,sys; [print(w['address']) for w in json.load(sys.stdin).get('watchers', [])]" 2>/dev/null); do
                    ceph osd blocklist add "$w" 60 >/dev/null 2>&1
                done
                for s in $(rbd snap ls --format json "$1" | python3 -c "import json,sys; [print(x['name']) for x in json.load(sys.stdin) if x.get('protected') == 'true']"); do
                    rbd snap unprotect "$1@$s" >/dev/null 2>&1
                done
                rbd snap purge --no-progress "$1" >/dev/null 2>&1
                for i in $(seq 30); do rbd rm --no-progress "$1" >/dev/null 2>&1 && return 0; sleep 1; done
                echo "could not remove $1" >&2
            }
            """#
        _ = try? run(([script] + specs.map { "purge \(shellQuote($0))" }).joined(separator: "\n"), timeout: 300)
    }
}

extension MountedRBDFS {
    /// The pid of the daemon serving this mount ([r] keeps pgrep from matching the shell running it).
    func daemonPID() throws -> Int32 {
        let output = try sh("pgrep -f -- '[r]bdfs mount \(path) '").split(separator: "\n")
        guard output.count == 1, let pid = Int32(String(output[0]).trimmed) else {
            throw CommandFailed(command: "pgrep rbdfs mount \(path)", result: CommandResult(status: 1, stdout: output.joined(separator: "\n"), stderr: "expected one daemon"))
        }
        return pid
    }

    /// True while a daemon serves this mount point.
    var daemonIsRunning: Bool {
        (try? run("pgrep -f -- '[r]bdfs mount \(path) '"))?.succeeded ?? false
    }

    /// After the daemon was killed: detaches the dead mount lazily, so nothing (including deinit) hangs on it.
    func detachDeadMount() {
        _ = try? run("umount -l \(shellQuote(path))", timeout: 30)
        for _ in 0..<50 where isMounted { usleep(100_000) }
    }

    /// The daemon's log so far.
    var log: String { (try? String(contentsOfFile: logFile, encoding: .utf8)) ?? "" }

    /// The log lines that contain every one of `fragments`.
    func logLines(containing fragments: [String]) -> [String] {
        log.split(separator: "\n").map(String.init).filter { line in fragments.allSatisfy { line.contains($0) } }
    }

    /// Waits up to 3 s for a log line containing every fragment (the log is written by another process).
    func logHasLine(_ fragments: String...) -> Bool {
        eventually(within: 3) { !logLines(containing: fragments).isEmpty }
    }
}

/// A Python string literal.
func pyQuote(_ text: String) -> String {
    "'" + text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "'", with: "\\'") + "'"
}

/// Runs one Python statement (with `os` imported) and returns "ok" or the raw errno as "errno N".
func pythonErrno(_ statement: String) throws -> String {
    try sh("""
        python3 - <<'PY'
        import os
        try:
            \(statement)
            print("ok")
        except OSError as e:
            print("errno", e.errno)
        PY
        """).trimmed
}
