import ArgumentParser
import Foundation

struct Unmount: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Unmount an rbdfs mount. The daemon flushes every open image and exits.")

    @Argument(help: "The mount point.")
    var mountpoint: String

    func run() throws {
        let path = URL(fileURLWithPath: mountpoint).standardizedFileURL.path
        guard MountTable.isMounted(path) else {
            throw ValidationError("\(path) is not mounted")
        }
        // As root, umount(2) directly; otherwise fusermount3, which is setuid for this.
        if getuid() == 0 {
            guard umount2(path, 0) == 0 else {
                throw ValidationError("umount \(path): \(String(cString: strerror(errno)))")
            }
        } else {
            let helper = Process()
            helper.executableURL = URL(fileURLWithPath: "/usr/bin/fusermount3")
            helper.arguments = ["-u", path]
            try helper.run()
            helper.waitUntilExit()
            guard helper.terminationStatus == 0 else { throw ExitCode(helper.terminationStatus) }
        }
    }
}

enum MountTable {
    /// True when `path` is a mount point in /proc/self/mounts.
    static func isMounted(_ path: String) -> Bool {
        guard let table = try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8) else { return false }
        return table.split(separator: "\n").contains { line in
            let fields = line.split(separator: " ")
            return fields.count > 1 && unescape(String(fields[1])) == path
        }
    }

    /// /proc/mounts writes space, tab, newline and backslash as octal escapes.
    private static func unescape(_ field: String) -> String {
        field.replacingOccurrences(of: "\\040", with: " ").replacingOccurrences(of: "\\011", with: "\t")
            .replacingOccurrences(of: "\\012", with: "\n").replacingOccurrences(of: "\\134", with: "\\")
    }
}
