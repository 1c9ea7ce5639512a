import ArgumentParser
import Foundation
import Logging

/// Detaching from the terminal while still telling the user whether the mount worked: the parent waits on a
/// pipe until the daemon says "mounted" or why not, and exits with that.
enum Daemon {
    /// The daemon's end of the pipe to the waiting parent.
    final class ParentLink {
        private let fd: Int32

        init(fd: Int32) { self.fd = fd }

        func reportSuccess() {
            send("OK\n")
            // The terminal is no longer ours: from here on only the log speaks.
            let null = open("/dev/null", O_RDWR)
            for target in [STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO] { dup2(null, target) }
            close(null)
        }

        func reportFailure(_ message: String) { send("ERR \(message)\n") }

        private func send(_ text: String) {
            var bytes = Array(text.utf8)
            _ = write(fd, &bytes, bytes.count)
            close(fd)
        }
    }

    /// Forks. The parent never returns: it exits 0 when the daemon reports success and 1 with the daemon's
    /// message otherwise. The daemon (child) returns its link to the parent.
    static func detach() throws -> ParentLink {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw MountError("pipe: \(String(cString: strerror(errno)))") }
        let pid = fork()
        guard pid >= 0 else { throw MountError("fork: \(String(cString: strerror(errno)))") }
        if pid > 0 {
            close(fds[1])
            let report = readAll(fds[0])
            if report.hasPrefix("OK") { Foundation.exit(0) }
            let message = report.hasPrefix("ERR ")
                ? String(report.dropFirst(4)).trimmingCharacters(in: .whitespacesAndNewlines)
                : "the daemon exited before the mount was live"
            FileHandle.standardError.write(Data("rbdfs: error: \(message)\n".utf8))
            Foundation.exit(1)
        }
        close(fds[0])
        closeInheritedDescriptors(keeping: fds[1])
        setsid()
        chdir("/")
        return ParentLink(fd: fds[1])
    }

    /// A daemon must not hold its starter's descriptors (a pipe it holds never reaches end-of-file).
    private static func closeInheritedDescriptors(keeping kept: Int32) {
        let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        for fd in open.compactMap(Int32.init) where fd > STDERR_FILENO && fd != kept {
            close(fd)
        }
    }

    private static func readAll(_ fd: Int32) -> String {
        var data = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = read(fd, &chunk, chunk.count)
            if count > 0 {
                data += chunk[0..<count]
            } else if count < 0 && errno == EINTR {
                continue
            } else {
                break
            }
        }
        return String(decoding: data, as: UTF8.self)
    }
}
