import Foundation
import Testing

/// The core of the mount against the real local cluster: the tree, sizes, bytes, EOF, growth, coherence.
/// Every check is made with a real client (rbd CLI, dd, cmp, stat, ls) through a real FUSE mount.
@Suite(.enabled(if: Environment.isReady, Environment.skipReason))
struct CoreMountTests {
    init() { Environment.printSkipReasonOnce() }

    @Test func poolsAreDirectoriesAndNamespacesSubdirectories() throws {
        let namespace = uniqueName("ns")
        let image = uniqueName("nsimg")
        try sh("rbd namespace create images/\(namespace) && rbd create images/\(namespace)/\(image) --size 8M")
        defer { _ = try? run("rbd rm images/\(namespace)/\(image) >/dev/null 2>&1; rbd namespace remove images/\(namespace)") }
        let mount = try MountedRBDFS()
        let pools = try sh("ls \(mount.q(""))").split(separator: "\n").map(String.init)
        #expect(Set(["images", "volumes", "vms"]).isSubset(of: Set(pools)))
        #expect(try sh("stat -c %F \(mount.q("images"))").hasPrefix("directory"))
        #expect(try sh("stat -c %F \(mount.q("images/\(namespace)"))").hasPrefix("directory"))
        #expect(try sh("ls \(mount.q("images/\(namespace)"))").split(separator: "\n").map(String.init) == [image])
        #expect(try sh("stat -c %s \(mount.q("images/\(namespace)/\(image)"))").trimmed == "\(8 << 20)")
    }

    @Test func onePoolMountedAsRoot() throws {
        let image = uniqueName("vmdisk")
        try sh("rbd create vms/\(image) --size 4M")
        defer { _ = try? run("rbd rm vms/\(image)") }
        let mount = try MountedRBDFS(["--pool", "vms"])
        let names = try sh("ls \(mount.q(""))").split(separator: "\n").map(String.init)
        #expect(names.contains(image))
        #expect(!names.contains("images"))
    }

    @Test func sizesAndBytesMatchRbdExport() throws {
        let image = uniqueName("export")
        let work = NSTemporaryDirectory() + image
        try sh("""
            mkdir -p \(work) && head -c 10485760 /dev/urandom > \(work)/src \
            && rbd import --no-progress \(work)/src images/\(image) && rbd snap create images/\(image)@before
            """)
        defer { _ = try? run("rbd snap purge images/\(image); rbd rm images/\(image); rm -rf \(work)") }
        // Change the head after the snapshot, so head and snapshot differ.
        try sh("rbd bench --io-type write --io-size 4K --io-total 64K --io-pattern seq images/\(image) >/dev/null")
        let mount = try MountedRBDFS()
        let size = try sh("rbd info --format json images/\(image) | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"size\"])'").trimmed
        #expect(try sh("stat -c %s \(mount.q("images/\(image)"))").trimmed == size)
        try sh("rbd export --no-progress images/\(image) \(work)/head && cmp \(work)/head \(mount.q("images/\(image)"))")
        try sh("rbd export --no-progress images/\(image)@before \(work)/snap && cmp \(work)/snap \(mount.q("images/\(image)@before"))")
        try sh("cmp \(work)/src \(mount.q("images/\(image)@before"))")
        #expect(try sh("stat -c %a \(mount.q("images/\(image)@before"))").trimmed == "444")
    }

    @Test func ddNotruncChangesExactlyThoseBytes() throws {
        let image = uniqueName("dd")
        let work = NSTemporaryDirectory() + image
        try sh("mkdir -p \(work) && head -c 16777216 /dev/urandom > \(work)/src && rbd import --no-progress \(work)/src images/\(image)")
        defer { _ = try? run("rbd rm images/\(image); rm -rf \(work)") }
        let mount = try MountedRBDFS()
        // 3 MiB + 100 bytes at an offset that straddles the 4 MiB object boundary.
        try sh("head -c 3145828 /dev/urandom > \(work)/patch")
        try sh("dd if=\(work)/patch of=\(mount.q("images/\(image)")) bs=1M seek=3145700 oflag=seek_bytes conv=notrunc,fsync status=none")
        try sh("dd if=\(work)/patch of=\(work)/src bs=1M seek=3145700 oflag=seek_bytes conv=notrunc status=none")
        try sh("rbd export --no-progress images/\(image) \(work)/after && cmp \(work)/src \(work)/after")
        #expect(try sh("rbd info --format json images/\(image) | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"size\"])'").trimmed == "16777216")
    }

    @Test func writesToASnapshotFailWithEROFS() throws {
        let image = uniqueName("ro")
        let work = NSTemporaryDirectory() + image
        try sh("mkdir -p \(work) && head -c 1048576 /dev/urandom > \(work)/src && rbd import --no-progress \(work)/src images/\(image) && rbd snap create images/\(image)@s")
        defer { _ = try? run("rbd snap purge images/\(image); rbd rm images/\(image); rm -rf \(work)") }
        let mount = try MountedRBDFS()
        let attempt = try run("dd if=/dev/zero of=\(mount.q("images/\(image)@s")) bs=4k count=1 conv=notrunc status=none")
        #expect(!attempt.succeeded)
        #expect(attempt.stderr.contains("Read-only file system"), "\(attempt.stderr)")
        let truncate = try run("truncate -s 0 \(mount.q("images/\(image)@s"))")
        #expect(truncate.stderr.contains("Read-only file system"), "\(truncate.stderr)")
        try sh("rbd export --no-progress images/\(image)@s \(work)/snap && cmp \(work)/src \(work)/snap")
    }

    @Test func aWritePastTheEndGrowsTheImage() throws {
        let image = uniqueName("grow")
        try sh("rbd create images/\(image) --size 1M")
        defer { _ = try? run("rbd rm images/\(image)") }
        let mount = try MountedRBDFS()
        // 2 MiB written at 5 MiB: the image must end at exactly 7 MiB once dd closes the file.
        try sh("head -c 2097152 /dev/urandom | dd of=\(mount.q("images/\(image)")) bs=1M seek=5 iflag=fullblock conv=notrunc,fsync status=none")
        #expect(try sh("rbd info --format json images/\(image) | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"size\"])'").trimmed == "\(7 << 20)")
        #expect(try sh("stat -c %s \(mount.q("images/\(image)"))").trimmed == "\(7 << 20)")
        // The gap reads as zeros.
        try sh("cmp -n 4194304 <(dd if=\(mount.q("images/\(image)")) bs=1M skip=1 count=4 status=none) /dev/zero")
    }

    @Test func changesByTheRbdCLIShowUpWithinSeconds() throws {
        let image = uniqueName("coherent")
        let mount = try MountedRBDFS()
        defer { _ = try? run("rbd snap purge images/\(image) >/dev/null 2>&1; rbd rm images/\(image)") }
        try sh("ls \(mount.q("images")) >/dev/null")
        try sh("rbd create images/\(image) --size 4M")
        #expect(try eventually(within: 3) { (try run("test -e \(mount.q("images/\(image)"))")).succeeded })
        try sh("rbd resize images/\(image) --size 12M")
        #expect(try eventually(within: 3) { try sh("stat -c %s \(mount.q("images/\(image)"))").trimmed == "\(12 << 20)" })
        try sh("rbd snap create images/\(image)@fresh")
        #expect(try eventually(within: 3) { try sh("ls \(mount.q("images"))").contains("\(image)@fresh") })
        try sh("rbd snap rm images/\(image)@fresh")
        #expect(try eventually(within: 3) { !(try sh("ls \(mount.q("images"))").contains("\(image)@fresh")) })
    }

    @Test func anOpenFileSeesAResizeByAnotherClient() throws {
        let image = uniqueName("openresize")
        try sh("rbd create images/\(image) --size 4M")
        defer { _ = try? run("rbd rm images/\(image)") }
        let mount = try MountedRBDFS()
        let handle = try #require(FileHandle(forReadingAtPath: mount.path + "/images/\(image)"))
        defer { try? handle.close() }
        try sh("rbd resize images/\(image) --size 8M")
        #expect(try eventually(within: 3) { try sh("stat -c %s \(mount.q("images/\(image)"))").trimmed == "\(8 << 20)" })
        try handle.seek(toOffset: 6 << 20)
        #expect(try handle.read(upToCount: 4096)?.count == 4096)
    }
}

@Suite(.enabled(if: Environment.isReady, Environment.skipReason))
struct MountLifecycleTests {
    @Test func anUnreachableClusterFailsFastWithAMessage() throws {
        let dir = NSTemporaryDirectory() + uniqueName("unreachable")
        try sh("""
            mkdir -p \(dir)/mnt && cat > \(dir)/ceph.conf <<'CONF'
            [global]
            mon host = v1:127.0.0.1:9
            auth cluster required = none
            auth service required = none
            auth client required = none
            CONF
            """)
        defer { _ = try? run("rm -rf \(dir)") }
        let started = Date()
        let result = try run("\(shellQuote(Environment.binary!)) mount \(dir)/mnt --conf \(dir)/ceph.conf --connect-timeout 5", timeout: 60)
        #expect(!result.succeeded)
        #expect(Date().timeIntervalSince(started) < 30)
        #expect(result.stderr.contains("rados_connect") || result.stderr.lowercased().contains("timed out"), "\(result.stderr)")
        #expect(!((try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? "").contains("\(dir)/mnt"))
    }

    @Test func aMissingPoolOrMountPointIsRefused() throws {
        let dir = NSTemporaryDirectory() + uniqueName("badpool")
        try sh("mkdir -p \(dir)")
        defer { _ = try? run("rm -rf \(dir)") }
        let pool = try run("\(shellQuote(Environment.binary!)) mount \(dir) --conf \(Environment.cephConf!) --pool no-such-pool")
        #expect(!pool.succeeded && pool.stderr.contains("no-such-pool"), "\(pool.stderr)")
        let missing = try run("\(shellQuote(Environment.binary!)) mount \(dir)/absent --conf \(Environment.cephConf!)")
        #expect(!missing.succeeded && missing.stderr.contains("does not exist"), "\(missing.stderr)")
    }

    @Test func unmountLeavesNoMountBehindAndTheDaemonExits() throws {
        let mount = try MountedRBDFS()
        #expect(mount.isMounted)
        mount.unmount()
        #expect(!mount.isMounted)
        // [r] keeps the pattern from matching the shell that runs pgrep.
        #expect(try eventually(within: 5) { !(try run("pgrep -f -- '[r]bdfs mount \(mount.path) '")).succeeded })
    }

    @Test func sigtermUnmountsCleanly() throws {
        let mount = try MountedRBDFS()
        try sh("pkill -TERM -f -- '[r]bdfs mount \(mount.path) '")
        #expect(eventually(within: 10) { !mount.isMounted })
    }
}

@Suite(.enabled(if: Environment.isReady, Environment.skipReason))
struct LargePoolTests {
    @Test func lsOfThreeHundredImagesListsThemAllWithTheirSizes() throws {
        let pool = uniqueName("many")
        try createRBDPool(pool)
        defer { _ = try? run("ceph osd pool rm \(pool) \(pool) --yes-i-really-really-mean-it") }
        // Sizes 1..300 MiB, so a wrong size for any entry shows.
        try sh("seq 1 300 | xargs -P 16 -I{} rbd create \(pool)/img{} --size {}M", timeout: 300)
        let mount = try MountedRBDFS()
        let listing = try sh("ls -l \(mount.q(pool))")
        let rows = listing.split(separator: "\n").filter { $0.hasPrefix("-") }
        #expect(rows.count == 300)
        var sizes: [String: String] = [:]
        for row in rows {
            let fields = row.split(separator: " ", omittingEmptySubsequences: true)
            sizes[String(fields.last!)] = String(fields[4])
        }
        for index in 1...300 {
            #expect(sizes["img\(index)"] == "\(index << 20)", "img\(index)")
        }
    }
}

extension String {
    var trimmed: String { trimmingCharacters(in: .whitespacesAndNewlines) }
}
