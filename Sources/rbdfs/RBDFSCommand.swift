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
            Pools are directories, RBD namespaces are subdirectories, images are read-write files and each
            snapshot is a read-only file IMAGE@SNAP. Reads and writes go straight to librbd.
            """,
        version: version,
        subcommands: [Mount.self, Unmount.self]
    )
}

/// Log levels by name, for --log-level.
extension Logger.Level: @retroactive ExpressibleByArgument {}
