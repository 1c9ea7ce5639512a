import ArgumentParser
import Foundation

/// The form mount(8) uses through fuse3's helper, for `mount -t fuse.rbdfs` and fstab lines:
///
///     none /mnt/rbd fuse.rbdfs conf=/etc/ceph/ceph.conf,id=admin,pool=images,ro,_netdev 0 0
///
/// mount.fuse3 then runs `rbdfs none /mnt/rbd -o ro,conf=...,pool=images,dev,suid`.
struct FstabMount: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fstab-mount",
        abstract: "Mount as mount(8) does through mount.fuse3: rbdfs SOURCE MOUNTPOINT -o OPTIONS.",
        discussion: """
            rbdfs options: conf=FILE, id=NAME, keyring=FILE, pool=POOL, ro, sync, all_pools, allow_shrink,
            allow_pool_delete, object_size=BYTES, max_clone_depth=N, log_file=FILE, log_level=LEVEL,
            connect_timeout=SECONDS, io_timeout=SECONDS, attr_timeout=SECONDS. Generic mount options (rw, dev, suid, exec, atime, _netdev, auto, user,
            defaults and their no- forms) are accepted and left to the kernel's defaults; any other option
            is passed to FUSE (e.g. allow_other).
            """,
        shouldDisplay: false)

    @Argument(help: "The source field of fstab; ignored (write 'none' or the cluster's name).")
    var source: String

    @Argument(help: "The mount point.")
    var mountpoint: String

    @Option(name: .customShort("o"), help: "Comma-separated options.")
    var options: [String] = []

    func run() throws {
        var mount = try Mount.parse(Self.mountArguments(mountpoint: mountpoint, options: options))
        try mount.validate()
        try mount.run()
    }

    /// Options mount(8) and mount.fuse3 add on their own, which say nothing to rbdfs.
    static let genericOptions: Set<String> = [
        "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime", "norelatime",
        "diratime", "nodiratime", "_netdev", "auto", "noauto", "user", "nouser", "users", "defaults", "nofail",
        "async",
    ]

    /// Translates `-o` options into `rbdfs mount` arguments.
    static func mountArguments(mountpoint: String, options: [String]) throws -> [String] {
        let valued: [String: String] = [
            "conf": "--conf", "id": "--id", "keyring": "--keyring", "pool": "--pool", "object_size": "--object-size",
            "max_clone_depth": "--max-clone-depth", "log_file": "--log-file", "log_level": "--log-level",
            "connect_timeout": "--connect-timeout", "io_timeout": "--io-timeout", "attr_timeout": "--attr-timeout",
        ]
        let flags: [String: String] = [
            "ro": "--read-only", "all_pools": "--all-pools", "allow_shrink": "--allow-shrink",
            "allow_pool_delete": "--allow-pool-delete", "sync": "--sync",
        ]
        var arguments = [mountpoint]
        var fuseOptions: [String] = []
        for option in options.flatMap({ $0.split(separator: ",").map(String.init) }) where !option.isEmpty {
            let parts = option.split(separator: "=", maxSplits: 1).map(String.init)
            if parts.count == 2, let flag = valued[parts[0]] {
                arguments += [flag, parts[1]]
            } else if parts.count == 1, let flag = flags[option] {
                arguments.append(flag)
            } else if valued[parts[0]] != nil {
                throw ValidationError("option \(option) needs a value: \(parts[0])=...")
            } else if !genericOptions.contains(option) {
                fuseOptions.append(option)
            }
        }
        if !fuseOptions.isEmpty { arguments += ["-o", fuseOptions.joined(separator: ",")] }
        return arguments
    }
}
