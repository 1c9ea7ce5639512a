import Foundation
import Testing

/// The operator surface: mount(8) through fuse3's helper, `rbdfs info`, `rbdfs flatten`, help texts.
@Suite(.enabled(if: Environment.isReady, Environment.skipReason))
struct OperatorTests {
    /// mount.fuse3 runs `rbdfs` from mount(8)'s fixed PATH: put it in /usr/local/bin for the test (unless an
    /// rbdfs is installed there already, which is then what runs).
    static let helperLink = "/usr/local/bin/rbdfs"

    @Test func mountDashTFuseRbdfsWithOptionsAndUmount() throws {
        let installed = FileManager.default.fileExists(atPath: Self.helperLink)
        if !installed { try sh("ln -s \(shellQuote(Environment.binary!)) \(Self.helperLink)") }
        defer { if !installed { _ = try? run("rm -f \(Self.helperLink)") } }
        let image = uniqueName("fstab")
        try sh("rbd create images/\(image) --size 4M")
        defer { _ = try? run("rbd rm images/\(image)") }
        let dir = NSTemporaryDirectory() + uniqueName("fstab-mnt")
        try sh("mkdir -p \(dir)")
        defer { _ = try? run("umount \(dir); rmdir \(dir)") }
        try sh("mount -t fuse.rbdfs none \(dir) -o conf=\(Environment.cephConf!),id=admin,pool=images,ro,_netdev,log_file=\(dir).log")
        // pool=images: the pool is the root; ro: writes are refused with EROFS.
        #expect(try sh("ls \(dir)").split(separator: "\n").contains { $0 == image })
        let write = try run("dd if=/dev/zero of=\(dir)/\(image) bs=4k count=1 conv=notrunc")
        #expect(write.stderr.contains("Read-only file system"), "\(write.stderr)")
        #expect(try sh("grep ' \(dir) ' /proc/mounts").contains("fuse.rbdfs"))
        try sh("umount \(dir)")
        #expect(try eventually(within: 5) { !(try run("grep -q ' \(dir) ' /proc/mounts")).succeeded })
    }

    @Test func theHelperFormAcceptsTheOptionsMountFuse3Passes() throws {
        let dir = NSTemporaryDirectory() + uniqueName("helper-mnt")
        try sh("mkdir -p \(dir)")
        defer { _ = try? run("umount \(dir); rmdir \(dir)") }
        // Exactly what mount.fuse3 runs for an fstab line.
        try sh("\(shellQuote(Environment.binary!)) none \(dir) -o ro,conf=\(Environment.cephConf!),pool=vms,dev,suid")
        #expect(try sh("grep ' \(dir) ' /proc/mounts").contains(" ro,"))
        // SIGTERM to a daemon started this way unmounts cleanly.
        try sh("pkill -TERM -f -- '[r]bdfs none \(dir) '")
        #expect(try eventually(within: 10) { !(try run("grep -q ' \(dir) ' /proc/mounts")).succeeded })
    }

    @Test func infoShowsTheChainAndTheChildrenAsRbdSeesThem() throws {
        let root = uniqueName("inforoot")
        try sh("rbd create images/\(root) --size 8M")
        let mount = try MountedRBDFS()
        // A three-deep chain: root@s -> c1, c1@s -> c2, c2@s -> c3; plus a second clone of root@s.
        var parent = "images/\(root)"
        try sh("ln \(mount.q(parent)) \(mount.q("\(parent)@s"))")
        for depth in 1...3 {
            let clone = "vms/\(root)-c\(depth)"
            try sh("ln \(mount.q("\(parent)@s")) \(mount.q(clone))")
            if depth < 3 { try sh("ln \(mount.q(clone)) \(mount.q("\(clone)@s"))") }
            parent = clone
        }
        try sh("ln \(mount.q("images/\(root)@s")) \(mount.q("volumes/\(root)-other"))")
        defer {
            _ = try? run("""
                for i in vms/\(root)-c3 vms/\(root)-c2 vms/\(root)-c1 volumes/\(root)-other images/\(root); do
                  rbd snap unprotect $i@s 2>/dev/null; rbd snap purge $i 2>/dev/null; rbd rm $i; done
                """)
        }
        let text = try sh("\(shellQuote(Environment.binary!)) info \(mount.q("vms/\(root)-c3"))")
        #expect(text.contains("parent: vms/\(root)-c2@s"), "\(text)")
        #expect(text.contains("vms/\(root)-c3 *"), "\(text)")
        for name in ["images/\(root)", "vms/\(root)-c1", "vms/\(root)-c2", "volumes/\(root)-other"] {
            #expect(text.contains(name), "\(name) missing in \(text)")
        }
        let json = try sh("\(shellQuote(Environment.binary!)) info --json \(mount.q("vms/\(root)-c3"))")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        #expect(object["parents"] as? [String] == ["vms/\(root)-c2@s", "vms/\(root)-c1@s", "images/\(root)@s"])
        let file = try #require(object["file"] as? [String: Any])
        let rbdInfo = try sh("rbd info --format json vms/\(root)-c3")
        let info = try #require(try JSONSerialization.jsonObject(with: Data(rbdInfo.utf8)) as? [String: Any])
        #expect(file["id"] as? String == info["id"] as? String)
        #expect((file["size"] as? NSNumber)?.int64Value == (info["size"] as? NSNumber)?.int64Value)
        // The children of root@s, as `rbd children` lists them.
        let family = try #require(object["family"] as? [String: Any])
        let snapshots = try #require(family["snapshots"] as? [[String: Any]])
        let clones = (snapshots.first?["clones"] as? [[String: Any]])?.compactMap { $0["image"] as? String } ?? []
        let children = try sh("rbd children images/\(root)@s").split(separator: "\n").map(String.init)
        #expect(Set(clones) == Set(children), "\(clones) vs \(children)")
    }

    @Test func flattenCommandDetachesACloneWithProgress() throws {
        let base = uniqueName("flatcmd")
        try sh("rbd create images/\(base) --size 12M && rbd bench --io-type write --io-size 1M --io-total 12M images/\(base) >/dev/null")
        let mount = try MountedRBDFS()
        try sh("ln \(mount.q("images/\(base)")) \(mount.q("images/\(base)@s")) && ln \(mount.q("images/\(base)@s")) \(mount.q("vms/\(base)-clone"))")
        defer { _ = try? run("rbd rm vms/\(base)-clone; rbd snap unprotect images/\(base)@s; rbd snap purge images/\(base); rbd rm images/\(base)") }
        let output = try sh("\(shellQuote(Environment.binary!)) flatten \(mount.q("vms/\(base)-clone")) --conf \(Environment.cephConf!)")
        #expect(output.contains("100%") || output.contains("done"), "\(output)")
        #expect(!(try sh("rbd info vms/\(base)-clone")).contains("parent:"))
        try sh("cmp \(mount.q("vms/\(base)-clone")) \(mount.q("images/\(base)@s"))")
    }

    @Test func debugLogsTraceEveryRequestAndRefusalsNameThePathTheCallAndTheErrno() throws {
        let image = uniqueName("trace")
        try sh("rbd create images/\(image) --size 4M && rbd snap create images/\(image)@s")
        defer { _ = try? run("rbd snap purge images/\(image); rbd rm images/\(image)") }
        let mount = try MountedRBDFS()  // --log-level debug
        try sh("dd if=\(mount.q("images/\(image)")) of=/dev/null bs=1M count=1 status=none")
        _ = try run("truncate -s 0 \(mount.q("images/\(image)@s"))")
        let log = try String(contentsOfFile: mount.logFile, encoding: .utf8)
        #expect(log.contains("fuse read: ok in "), "no traced read in the log")
        #expect(log.contains("fuse lookup: ok in "), "no traced lookup in the log")
        // One line for the refusal, naming the path, what was refused and the errno.
        #expect(log.split(separator: "\n").contains {
            $0.contains("images/\(image)@s") && $0.contains("read-only") && $0.contains("[errno 30]")
        }, "no refusal line in the log")
    }

    static let examples = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("mount-examples").path

    /// The options of the shipped fstab line and systemd unit mount the test cluster (conf pointed at it).
    @Test(arguments: ["fstab", "mnt-rbd.mount"])
    func shippedMountExamplesMount(_ example: String) throws {
        let text = try String(contentsOfFile: "\(Self.examples)/\(example)", encoding: .utf8)
        let line = try #require(text.split(separator: "\n").first { $0.hasPrefix("none") || $0.hasPrefix("Options=") })
        let options = line.hasPrefix("Options=")
            ? String(line.dropFirst("Options=".count))
            : String(line.split(separator: " ", omittingEmptySubsequences: true)[3])
        let adapted = options.split(separator: ",").map { option -> String in
            if option.hasPrefix("conf=") { return "conf=\(Environment.cephConf!)" }
            if option.hasPrefix("log_file=") { return "log_file=\(NSTemporaryDirectory())\(example).log" }
            return String(option)
        }.joined(separator: ",")
        let dir = NSTemporaryDirectory() + uniqueName("example-mnt")
        try sh("mkdir -p \(dir)")
        defer { _ = try? run("umount \(dir); rmdir \(dir)") }
        try sh("\(shellQuote(Environment.binary!)) none \(dir) -o \(adapted)")
        try sh("ls \(dir) >/dev/null")
        try sh("umount \(dir)")
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/systemd-analyze"),
                   "systemd-analyze is not installed: the unit file is not verified"))
    func theSystemdUnitVerifies() throws {
        let work = NSTemporaryDirectory() + uniqueName("unit")
        try sh("mkdir -p \(work) && cp \(Self.examples)/mnt-rbd.mount \(work)/ && systemd-analyze verify \(work)/mnt-rbd.mount")
        _ = try? run("rm -rf \(work)")
    }

    @Test func helpTextsNameEveryOption() throws {
        let help = try sh("\(shellQuote(Environment.binary!)) mount --help")
        for option in ["--conf", "--id", "--keyring", "--pool", "--all-pools", "--read-only", "--allow-shrink",
                       "--allow-pool-delete", "--object-size", "--max-clone-depth", "--connect-timeout", "--threads",
                       "--read-ahead-kb", "--foreground", "--log-file", "--log-level", "-o"] {
            #expect(help.contains(option), "\(option) not in mount --help")
        }
        let top = try sh("\(shellQuote(Environment.binary!)) --help")
        for command in ["mount", "unmount", "info", "flatten"] { #expect(top.contains(command)) }
        #expect(try sh("\(shellQuote(Environment.binary!)) --version").trimmed.first?.isNumber == true)
        let wrong = try run("\(shellQuote(Environment.binary!)) mount")
        #expect(!wrong.succeeded && wrong.stderr.contains("Missing expected argument"), "\(wrong.stderr)")
    }
}
