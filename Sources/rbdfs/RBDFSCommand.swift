import ArgumentParser
import Foundation
import Logging

@main
struct RBDFSCommand: ParsableCommand {
    static let version = "0.1.0"

    static let configuration = CommandConfiguration(
        commandName: "rbdfs",
        abstract: "Show a Ceph cluster's RBD images as files.",
        discussion: """
            Pools are directories, RBD namespaces are subdirectories, images are read-write files and each \
            snapshot is a read-only file IMAGE@SNAP. Reads and writes go straight to librbd.

            mount(8) can mount it too: 'mount -t fuse.rbdfs none MOUNTPOINT -o conf=FILE,pool=POOL,ro' \
            (see 'rbdfs help fstab-mount' for the options).
            """,
        version: version,
        subcommands: [Mount.self, Unmount.self, Info.self, Flatten.self, FstabMount.self],
        defaultSubcommand: FstabMount.self
    )
}

/// Log levels by name, for --log-level.
extension Logger.Level: @retroactive ExpressibleByArgument {}
