import ArgumentParser
import FUSE
import Foundation
import Logging
import RBD
import Storage

/// `rbdfs flatten PATH`: detaches a clone in the mount from its parent, showing librbd's progress. It talks
/// to the cluster itself (the mount's `user.rbd.flatten` attribute does the same without progress).
struct Flatten: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Flatten a clone in an rbdfs mount (copy its parent's data in), with progress.")

    @Argument(help: "A clone (image file) in an rbdfs mount.")
    var path: String

    @OptionGroup var cluster: ClusterOptions

    func run() throws {
        guard let name = MountedFileAttributes.value("user.rbd.name", of: path) else {
            throw ValidationError("\(path) is not an image in an rbdfs mount")
        }
        guard !name.contains("@") else { throw ValidationError("\(name) is a snapshot; only an image can be flattened") }
        guard MountedFileAttributes.value("user.rbd.parent", of: path) != nil else {
            print("\(name) has no parent: nothing to flatten")
            return
        }
        let parts = name.split(separator: "/").map(String.init)
        let spec = parts.count == 3
            ? ImageSpec(pool: parts[0], namespace: parts[1], name: parts[2])
            : ImageSpec(pool: parts[0], name: parts[1])
        let store = try CephStore.connect(conf: cluster.conf, id: cluster.id, keyring: cluster.keyring, logger: Logger(label: "rbdfs"))
        defer { store.shutdown() }
        let image = try store.openImage(spec, snapshot: nil, readOnly: false)
        defer { image.close() }
        let progress = ProgressReport(title: "flattening \(name)", terminal: isatty(STDOUT_FILENO) != 0)
        try image.flatten { done, total in progress.update(done: done, total: total) }
        progress.finish()
    }
}

/// A progress bar on a terminal; otherwise a plain line every 10%.
final class ProgressReport: @unchecked Sendable {
    private let title: String
    private let terminal: Bool
    private let lock = NSLock()
    private var lastTenth = -1

    init(title: String, terminal: Bool) {
        self.title = title
        self.terminal = terminal
    }

    func update(done: UInt64, total: UInt64) {
        let fraction = total == 0 ? 1 : Double(done) / Double(total)
        lock.withLock {
            if terminal {
                let width = 40, filled = Int(fraction * Double(width))
                let bar = String(repeating: "#", count: filled) + String(repeating: " ", count: width - filled)
                print("\r\(title) [\(bar)] \(Int(fraction * 100))%", terminator: "")
                fflush(stdout)
            } else if Int(fraction * 10) > lastTenth {
                lastTenth = Int(fraction * 10)
                print("\(title): \(lastTenth * 10)%")
            }
        }
    }

    func finish() {
        if terminal { print("") }
        print("\(title): done")
    }
}
