import Foundation
import Testing

/// Thin images end to end (issue 4), against the real local cluster through a real mount, checked with the
/// file tools that know about sparse files (xfs_io, fallocate, cp --sparse, qemu-img, du, ls -s, df) and
/// with the rbd CLI as the judge of what the cluster holds.
@Suite(.enabled(if: Environment.isReady, Environment.skipReason))
struct ThinImageTests {
    init() { Environment.printSkipReasonOnce() }

    static let mib: UInt64 = 1 << 20

    // MARK: - SEEK_DATA / SEEK_HOLE

    @Test func seekDataAndHoleGiveTheBoundsOfTheObjectHoldingData() throws {
        let mib = Self.mib
        let image = uniqueName("thin-seek")
        try sh("rbd create images/\(image) --size 64M")
        defer { _ = try? run("rbd rm images/\(image)") }
        let mount = try MountedRBDFS()
        let file = mount.q("images/\(image)")
        try sh("dd if=/dev/urandom of=\(file) bs=4096 count=1 seek=9M oflag=seek_bytes conv=notrunc,fsync status=none")

        // One object (4 MiB, the default) holds data: [8 MiB, 12 MiB).
        let results = try Self.xfsSeek(file, ["seek -d 0", "seek -h 0", "seek -h 9M", "seek -d 9M", "seek -d 12M", "seek -h 40M"])
        #expect(results == ["\(8 * mib)", "0", "\(12 * mib)", "\(9 * mib)", "EOF", "\(40 * mib)"], "\(mount.logFile)")
        // The same through lseek(2) itself: ENXIO for SEEK_DATA past the last data and at the end.
        let probe = try sh("""
            python3 - \(file) <<'PY'
            import errno, os, sys
            fd = os.open(sys.argv[1], os.O_RDONLY)
            for offset, whence in [(0, os.SEEK_DATA), (12 << 20, os.SEEK_DATA), (64 << 20, os.SEEK_DATA), (64 << 20, os.SEEK_HOLE)]:
                try:
                    print(os.lseek(fd, offset, whence))
                except OSError as e:
                    print(errno.errorcode[e.errno])
            PY
            """).split(separator: "\n").map(String.init)
        #expect(probe == ["\(8 * mib)", "ENXIO", "ENXIO", "ENXIO"])
        withExtendedLifetime(mount) {}
    }

    @Test func seekDataOnACloneCountsTheParentsData() throws {
        let mib = Self.mib
        let image = uniqueName("thin-seekparent")
        let clone = uniqueName("thin-seekclone")
        try sh("rbd create images/\(image) --size 64M")
        defer {
            _ = try? run("rbd rm vms/\(clone); rbd snap unprotect images/\(image)@s; rbd snap purge images/\(image); rbd rm images/\(image)")
        }
        let mount = try MountedRBDFS()
        try sh("dd if=/dev/urandom of=\(mount.q("images/\(image)")) bs=4096 count=1 seek=9M oflag=seek_bytes conv=notrunc,fsync status=none")
        try sh("ln \(mount.q("images/\(image)")) \(mount.q("images/\(image)@s"))")
        try sh("ln \(mount.q("images/\(image)@s")) \(mount.q("vms/\(clone)"))")
        #expect(try sh("rbd info --format json vms/\(clone)").contains("\"parent\""))

        let file = mount.q("vms/\(clone)")
        #expect(try Self.xfsSeek(file, ["seek -d 0", "seek -h 8M", "seek -d 12M"]) == ["\(8 * mib)", "\(12 * mib)", "EOF"])
        // The clone's own data counts too, next to the parent's.
        try sh("dd if=/dev/urandom of=\(file) bs=4096 count=1 seek=40M oflag=seek_bytes conv=notrunc,fsync status=none")
        #expect(try Self.xfsSeek(file, ["seek -d 0", "seek -d 12M", "seek -h 40M"]) == ["\(8 * mib)", "\(40 * mib)", "\(44 * mib)"])
        // The snapshot file answers from the snapshot: the parent's object only.
        #expect(try Self.xfsSeek(mount.q("images/\(image)@s"), ["seek -d 0", "seek -d 12M"]) == ["\(8 * mib)", "EOF"])
        withExtendedLifetime(mount) {}
    }

    // MARK: - fallocate

    @Test func punchingAnUnalignedHoleZerosExactlyThatRange() throws {
        let mib = Self.mib
        let image = uniqueName("thin-punch")
        let work = NSTemporaryDirectory() + image
        try sh("mkdir -p \(work) && head -c \(16 * mib) /dev/urandom > \(work)/src && rbd import --no-progress \(work)/src images/\(image)")
        defer { _ = try? run("rbd rm images/\(image); rm -rf \(work)") }
        let mount = try MountedRBDFS()
        let file = mount.q("images/\(image)")
        #expect(try Self.rbdUsed("images/\(image)") == 16 * mib)

        // 1000 bytes at 9 MiB + 100: inside one object, aligned to nothing.
        let offset = 9 * mib + 100
        try sh("fallocate -p -o \(offset) -l 1000 \(file)")
        try sh("fallocate -p -o \(offset) -l 1000 \(work)/src")
        try sh("cmp -n 1000 <(dd if=\(file) bs=1000 skip=\(offset) iflag=skip_bytes count=1 status=none) /dev/zero")
        try sh("cmp \(work)/src \(file)")
        try sh("rbd export --no-progress images/\(image) \(work)/after && cmp \(work)/src \(work)/after")
        #expect(try sh("stat -c %s \(file)").trimmed == "\(16 * mib)", "PUNCH_HOLE keeps the size")

        // A whole object: its space is given back.
        try sh("fallocate -p -o \(4 * mib) -l \(4 * mib) \(file)")
        try sh("fallocate -p -o \(4 * mib) -l \(4 * mib) \(work)/src")
        try sh("cmp \(work)/src \(file)")
        #expect(try Self.rbdUsed("images/\(image)") == 12 * mib, "\(mount.logFile)")

        // A range crossing an object boundary: the partial ends zeroed, the whole object in it released.
        try sh("fallocate -p -o \(11 * mib + 7) -l \(5 * mib - 7) \(file)")
        try sh("fallocate -p -o \(11 * mib + 7) -l \(5 * mib - 7) \(work)/src")
        try sh("rbd export --no-progress images/\(image) \(work)/after2 && cmp \(work)/src \(work)/after2")
        #expect(try Self.rbdUsed("images/\(image)") == 8 * mib)
        withExtendedLifetime(mount) {}
    }

    @Test func zeroRangeReadsAsZerosAndAllocatesNothing() throws {
        let mib = Self.mib
        let image = uniqueName("thin-zero")
        let work = NSTemporaryDirectory() + image
        try sh("mkdir -p \(work) && head -c \(16 * mib) /dev/urandom > \(work)/src && rbd import --no-progress \(work)/src images/\(image)")
        defer { _ = try? run("rbd rm images/\(image); rm -rf \(work)") }
        let mount = try MountedRBDFS()
        let file = mount.q("images/\(image)")
        // Across the 4 MiB boundary, unaligned at both ends.
        try sh("fallocate -z -o \(3 * mib + 512) -l \(2 * mib + 1000) \(file)")
        try sh("fallocate -z -o \(3 * mib + 512) -l \(2 * mib + 1000) \(work)/src")
        try sh("cmp -n \(2 * mib + 1000) <(dd if=\(file) bs=1M skip=\(3 * mib + 512) iflag=skip_bytes,count_bytes count=\(2 * mib + 1000) status=none) /dev/zero")
        try sh("rbd export --no-progress images/\(image) \(work)/after && cmp \(work)/src \(work)/after")
        #expect(try sh("stat -c %s \(file)").trimmed == "\(16 * mib)")
        #expect(try Self.rbdUsed("images/\(image)") <= 16 * mib, "zeroing never allocates more")

        // Zeroing never-written space of a thin image allocates nothing.
        let thin = uniqueName("thin-zero-empty")
        try sh("rbd create images/\(thin) --size 32M")
        defer { _ = try? run("rbd rm images/\(thin)") }
        try sh("fallocate -z -o \(mib) -l \(20 * mib) \(mount.q("images/\(thin)"))")
        try sh("cmp -n \(32 * mib) \(mount.q("images/\(thin)")) /dev/zero")
        #expect(try Self.rbdUsed("images/\(thin)") == 0)
        withExtendedLifetime(mount) {}
    }

    @Test func plainFallocatePastTheEndGrowsTheImage() throws {
        let mib = Self.mib
        let image = uniqueName("thin-grow")
        try sh("rbd create images/\(image) --size 4M")
        defer { _ = try? run("rbd rm images/\(image)") }
        let mount = try MountedRBDFS()
        let file = mount.q("images/\(image)")
        try sh("fallocate -o 0 -l \(20 * mib) \(file)")
        #expect(try Self.rbdSize("images/\(image)") == 20 * mib, "\(mount.logFile)")
        #expect(try sh("stat -c %s \(file)").trimmed == "\(20 * mib)")
        // Inside the image there is nothing to do: the size stays, and space stays thin.
        try sh("fallocate -o \(mib) -l \(mib) \(file)")
        // KEEP_SIZE past the end: nothing to do either.
        try sh("fallocate -n -o 0 -l \(40 * mib) \(file)")
        #expect(try Self.rbdSize("images/\(image)") == 20 * mib)
        #expect(try Self.rbdUsed("images/\(image)") == 0)
        try sh("cmp -n \(20 * mib) \(file) /dev/zero")
        withExtendedLifetime(mount) {}
    }

    @Test func fallocateOnASnapshotFailsAndChangesNothing() throws {
        let image = uniqueName("thin-snapfalloc")
        let work = NSTemporaryDirectory() + image
        try sh("mkdir -p \(work) && head -c \(8 * Self.mib) /dev/urandom > \(work)/src && rbd import --no-progress \(work)/src images/\(image) && rbd snap create images/\(image)@s")
        defer { _ = try? run("rbd snap purge images/\(image); rbd rm images/\(image); rm -rf \(work)") }
        let mount = try MountedRBDFS()
        let snapshot = mount.q("images/\(image)@s")
        for arguments in ["-p -o 4096 -l \(4 * Self.mib)", "-z -o 0 -l 4096", "-o 0 -l \(16 * Self.mib)"] {
            let attempt = try run("fallocate \(arguments) \(snapshot)")
            #expect(!attempt.succeeded, "fallocate \(arguments) on a snapshot succeeded")
            #expect(attempt.stderr.contains("Read-only file system") || attempt.stderr.contains("Bad file descriptor"),
                    "\(attempt.stderr)")
        }
        try sh("rbd export --no-progress images/\(image)@s \(work)/snap && cmp \(work)/src \(work)/snap")
        try sh("cmp \(work)/src \(snapshot)")
        withExtendedLifetime(mount) {}
    }

    // MARK: - Copies in and out stay thin

    @Test func cpSparseAlwaysOfAOneGiBFileStaysThin() throws {
        let mib = Self.mib
        let image = uniqueName("thin-cpsparse")
        let work = NSTemporaryDirectory() + image
        // 4 MiB of data at 301 MiB: across an object boundary, so two objects at most.
        try sh("mkdir -p \(work) && truncate -s 1G \(work)/src && dd if=/dev/urandom of=\(work)/src bs=1M count=4 seek=301 conv=notrunc status=none")
        defer { _ = try? run("rbd rm images/\(image); rm -rf \(work)") }
        let mount = try MountedRBDFS()
        let file = mount.q("images/\(image)")
        try sh("cp --sparse=always \(work)/src \(file)", timeout: 300)
        try sh("cmp \(work)/src \(file)", timeout: 300)
        #expect(try Self.rbdSize("images/\(image)") == 1 << 30)
        let used = try Self.rbdUsed("images/\(image)")
        #expect(used >= 4 * mib && used <= 8 * mib, "rbd du used \(used)")

        // And back out with a plain cp (--sparse=auto): the image looks sparse (st_blocks) and its holes are
        // found with SEEK_DATA / SEEK_HOLE, so the local copy is as thin as the source.
        try sh("cp \(file) \(work)/back", timeout: 300)
        try sh("cmp \(work)/src \(work)/back", timeout: 300)
        let kib = try UInt64(sh("du -k \(work)/back | cut -f1").trimmed)!
        #expect(kib <= 8 * 1024, "the copy back uses \(kib) KiB")
        withExtendedLifetime(mount) {}
    }

    @Test func cpOfAZeroFilledFileSendsOnlyTheData() throws {
        let mib = Self.mib
        let image = uniqueName("thin-cpzeros")
        let never = uniqueName("thin-cpnever")
        let work = NSTemporaryDirectory() + image
        // 64 MiB of written zeros (not a sparse file), then 1 MiB of data: 65 MiB.
        try sh("mkdir -p \(work) && dd if=/dev/zero of=\(work)/src bs=1M count=64 status=none && head -c \(mib) /dev/urandom >> \(work)/src && sync \(work)/src")
        defer { _ = try? run("rbd rm images/\(image); rbd rm images/\(never); rm -rf \(work)") }
        #expect(try UInt64(sh("du -k \(work)/src | cut -f1").trimmed)! >= 65 * 1024, "the source must not be sparse")
        let mount = try MountedRBDFS()
        try sh("cp \(work)/src \(mount.q("images/\(image)"))", timeout: 300)
        try sh("cmp \(work)/src \(mount.q("images/\(image)"))")
        #expect(try Self.rbdSize("images/\(image)") == 65 * mib)
        let used = try Self.rbdUsed("images/\(image)")
        #expect(used <= 4 * mib, "rbd du used \(used): the zeros were written")
        // --sparse=never writes every zero byte through the mount: still one object.
        try sh("cp --sparse=never \(work)/src \(mount.q("images/\(never)"))", timeout: 300)
        try sh("cmp \(work)/src \(mount.q("images/\(never)"))")
        let usedNever = try Self.rbdUsed("images/\(never)")
        #expect(usedNever <= 4 * mib, "rbd du used \(usedNever): the zeros were written")
        withExtendedLifetime(mount) {}
    }

    @Test func qemuImgConvertsToAnEquallySparseFileAndMapsTheHoles() throws {
        let mib = Self.mib
        let image = uniqueName("thin-qemu")
        let work = NSTemporaryDirectory() + image
        try sh("mkdir -p \(work) && rbd create images/\(image) --size 256M")
        defer { _ = try? run("rbd rm images/\(image); rm -rf \(work)") }
        let mount = try MountedRBDFS()
        let file = mount.q("images/\(image)")
        // 64 KiB at 10 MiB + 4 KiB (object [8, 12) MiB) and 64 KiB at 200 MiB (object [200, 204) MiB).
        try sh("dd if=/dev/urandom of=\(file) bs=64K count=1 seek=\(10 * mib + 4096) oflag=seek_bytes conv=notrunc,fsync status=none")
        try sh("dd if=/dev/urandom of=\(file) bs=64K count=1 seek=\(200 * mib) oflag=seek_bytes conv=notrunc,fsync status=none")

        try sh("qemu-img convert -f raw -O raw \(file) \(work)/out.raw", timeout: 300)
        try sh("cmp \(work)/out.raw \(file)")
        #expect(try sh("stat -c %s \(work)/out.raw").trimmed == "\(256 * mib)")
        let kib = try UInt64(sh("du -k \(work)/out.raw | cut -f1").trimmed)!
        #expect(kib <= 8 * 1024, "local copy uses \(kib) KiB")

        // qemu-img map: data only in the two objects, holes everywhere else, reported as such.
        let map = try sh("""
            qemu-img map -f raw --output=json \(file) | python3 -c '
            import json, sys
            for e in json.load(sys.stdin):
                print(e["start"], e["start"] + e["length"], "data" if e["data"] else "hole")
            '
            """)
        var data: [Range<UInt64>] = [], holes: [Range<UInt64>] = []
        for line in map.split(separator: "\n") {
            let fields = line.split(separator: " ")
            let range = UInt64(fields[0])!..<UInt64(fields[1])!
            if fields[2] == "data" { data.append(range) } else { holes.append(range) }
        }
        let objects = [8 * mib..<12 * mib, 200 * mib..<204 * mib]
        #expect(data.allSatisfy { extent in objects.contains { $0.lowerBound <= extent.lowerBound && extent.upperBound <= $0.upperBound } },
                "data outside the written objects: \(map)")
        for written in [10 * mib + 4096..<10 * mib + 4096 + 65536, 200 * mib..<200 * mib + 65536] {
            #expect(data.contains { $0.lowerBound <= written.lowerBound && written.upperBound <= $0.upperBound }, "\(written) not data: \(map)")
        }
        for hole in [0..<8 * mib, 12 * mib..<200 * mib, 204 * mib..<256 * mib] {
            let covered = holes.compactMap { $0.clamped(to: hole) }.reduce(0) { $0 + $1.count }
            #expect(covered == hole.count, "\(hole) not reported as a hole: \(map)")
        }
        withExtendedLifetime(mount) {}
    }

    // MARK: - st_blocks, du, ls -s, df

    @Test func aFreshCloneOfTenGiBUsesNothingAndGrowsAsWritten() throws {
        let mib = Self.mib
        let base = uniqueName("thin-dubase")
        let clone = uniqueName("thin-duclone")
        try sh("rbd create images/\(base) --size 10G")
        defer {
            _ = try? run("rbd rm vms/\(clone); rbd snap unprotect images/\(base)@s; rbd snap purge images/\(base); rbd rm images/\(base)")
        }
        let mount = try MountedRBDFS()
        try sh("dd if=/dev/urandom of=\(mount.q("images/\(base)")) bs=1M count=8 conv=notrunc,fsync status=none")
        try sh("ln \(mount.q("images/\(base)")) \(mount.q("images/\(base)@s"))")
        try sh("ln \(mount.q("images/\(base)@s")) \(mount.q("vms/\(clone)"))")
        let file = mount.q("vms/\(clone)")
        #expect(try sh("stat -c %s \(file)").trimmed == "\(10 << 30)")
        let freshBlocks = try Self.statBlocks(file)
        #expect(freshBlocks * 512 < mib, "fresh clone: st_blocks \(freshBlocks)")
        let freshKiB = try UInt64(sh("du -k \(file) | cut -f1").trimmed)!
        #expect(freshKiB < 1024, "fresh clone: du \(freshKiB) KiB")
        // Its parent holds its 8 MiB.
        Thread.sleep(forTimeInterval: 1.2)
        #expect(try Self.statBlocks(mount.q("images/\(base)")) == 8 * mib / 512)

        try sh("dd if=/dev/urandom of=\(file) bs=1M count=4 seek=1024 conv=notrunc,fsync status=none")
        Thread.sleep(forTimeInterval: 1.2)
        let writtenBlocks = try Self.statBlocks(file)
        #expect(writtenBlocks * 512 >= 4 * mib, "after writing 4 MiB: st_blocks \(writtenBlocks)")
        #expect(try UInt64(sh("du -k \(file) | cut -f1").trimmed)! >= 4096)
        #expect(writtenBlocks * 512 == (try Self.rbdUsed("vms/\(clone)")))
        withExtendedLifetime(mount) {}
    }

    @Test func stBlocksAndLsSizeAreRbdDuUsedBytes() throws {
        let mib = Self.mib
        let image = uniqueName("thin-blocks")
        try sh("rbd create images/\(image) --size 64M")
        defer { _ = try? run("rbd snap purge images/\(image); rbd rm images/\(image)") }
        let mount = try MountedRBDFS()
        let file = mount.q("images/\(image)")
        #expect(try Self.statBlocks(file) == 0)
        // Objects 0, 5, 8 and 9 (the last write crosses the 36 MiB boundary).
        try sh("dd if=/dev/urandom of=\(file) bs=4096 count=1 conv=notrunc,fsync status=none")
        try sh("dd if=/dev/urandom of=\(file) bs=1M count=1 seek=20 conv=notrunc,fsync status=none")
        try sh("dd if=/dev/urandom of=\(file) bs=1M count=5 seek=33 conv=notrunc,fsync status=none")
        Thread.sleep(forTimeInterval: 1.2)
        let used = try Self.rbdUsed("images/\(image)")
        #expect(used == 16 * mib)
        #expect(try Self.statBlocks(file) == used / 512)
        #expect(try sh("ls -s \(file)").split(separator: " ").first.map(String.init) == "\(used / 1024)")

        // Punching an object gives its blocks back.
        try sh("fallocate -p -o \(20 * mib) -l \(4 * mib) \(file)")
        Thread.sleep(forTimeInterval: 1.2)
        let afterPunch = try Self.rbdUsed("images/\(image)")
        #expect(afterPunch == 12 * mib)
        #expect(try Self.statBlocks(file) == afterPunch / 512)

        // A snapshot's blocks are what `rbd du` gives for it (the first snapshot: all it holds).
        try sh("rbd snap create images/\(image)@s")
        #expect(try eventually(within: 3) { (try run("test -e \(mount.q("images/\(image)@s"))")).succeeded })
        #expect(try Self.statBlocks(mount.q("images/\(image)@s")) == (try Self.rbdUsed("images/\(image)@s")) / 512)
        withExtendedLifetime(mount) {}
    }

    @Test func dfReportsTheClusterAndThePool() throws {
        let mib = Self.mib
        let image = uniqueName("thin-df")
        try sh("rbd create images/\(image) --size 16M")
        defer { _ = try? run("rbd rm images/\(image)") }
        let mount = try MountedRBDFS()
        try sh("dd if=/dev/urandom of=\(mount.q("images/\(image)")) bs=1M count=8 conv=notrunc,fsync status=none")

        // The cluster: size as `ceph df` gives it, use > 0 once the data has been counted (mgr stats lag).
        let cluster = try Self.cephDF()
        let root = try Self.statfs(mount.path)
        #expect(root.size > 0 && cluster.total > 0)
        #expect(Self.near(root.size, cluster.total), "df size \(root.size), ceph df total_bytes \(cluster.total)")
        #expect(try eventually(within: 30) { try Self.statfs(mount.path).used >= 8 * mib }, "df used stays below the data written")
        let rootUsed = try Self.statfs(mount.path).used
        let clusterUsed = try Self.cephDF().used
        #expect(Self.near(rootUsed, clusterUsed, slack: 64 * mib), "df used \(rootUsed), ceph df total_used_bytes \(clusterUsed)")
        let dfLine = try sh("df -B1 --output=size,used \(mount.q("")) | tail -1").trimmed.split(separator: " ").compactMap { UInt64($0) }
        #expect(dfLine.count == 2 && dfLine[0] > 0 && dfLine[1] > 0, "\(dfLine)")

        // The pool: its stored bytes as used, and room to grow into the cluster's free space.
        #expect(try eventually(within: 30) { try Self.statfs(mount.path + "/images").used >= 8 * mib }, "pool use stays below the data written")
        let before = try Self.cephDF().poolStored["images"] ?? 0
        let pool = try Self.statfs(mount.path + "/images")
        let after = try Self.cephDF().poolStored["images"] ?? 0
        #expect(pool.size > 0 && pool.size >= pool.used)
        #expect(pool.used + 64 * mib >= min(before, after) / 2 && pool.used <= max(before, after) * 2 + 64 * mib,
                "df used of the pool \(pool.used), ceph df stored \(before)...\(after)")
        #expect(Self.near(pool.size, cluster.total), "a pool may grow into the whole cluster")
        let poolLine = try sh("df -B1 --output=size,used \(mount.q("images")) | tail -1").trimmed.split(separator: " ").compactMap { UInt64($0) }
        #expect(poolLine.count == 2 && poolLine[0] > 0 && poolLine[1] > 0, "\(poolLine)")
        withExtendedLifetime(mount) {}
    }

    // MARK: - Helpers

    /// Runs xfs_io seek commands read-only on `file`; returns each result (an offset, or EOF).
    static func xfsSeek(_ file: String, _ commands: [String]) throws -> [String] {
        let output = try sh("xfs_io -r " + commands.map { "-c \(shellQuote($0))" }.joined(separator: " ") + " \(file)")
        return output.split(separator: "\n").filter { !$0.hasPrefix("Whence") }.compactMap { line in
            line.split(whereSeparator: { $0 == "\t" || $0 == " " }).last.map(String.init)
        }
    }

    /// `rbd du` used bytes of an image (its head) or of `image@snap`.
    static func rbdUsed(_ spec: String) throws -> UInt64 {
        let snapshotFilter = spec.contains("@") ? "True" : "\"snapshot\" not in i"
        let out = try sh("""
            rbd du --format json \(spec) | python3 -c 'import json,sys; print(sum(i["used_size"] for i in json.load(sys.stdin)["images"] if \(snapshotFilter)))'
            """)
        return UInt64(out.trimmed)!
    }

    static func rbdSize(_ spec: String) throws -> UInt64 {
        UInt64(try sh("rbd info --format json \(spec) | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"size\"])'").trimmed)!
    }

    static func statBlocks(_ file: String) throws -> UInt64 {
        UInt64(try sh("stat -c %b \(file)").trimmed)!
    }

    /// statfs(2) of a path through the mount, in bytes.
    static func statfs(_ path: String) throws -> (size: UInt64, used: UInt64) {
        let fields = try sh("stat -f -c '%S %b %f' \(shellQuote(path))").trimmed.split(separator: " ").map { UInt64($0)! }
        return (fields[0] * fields[1], fields[0] * (fields[1] - fields[2]))
    }

    static func cephDF() throws -> (total: UInt64, used: UInt64, poolStored: [String: UInt64]) {
        // The ceph CLI now and then fails to reach the mon under load ("problem getting command descriptions").
        let out = try sh("""
            for attempt in 1 2 3 4 5; do json=$(ceph df --format json) && break; sleep 1; done
            printf '%s' "$json" | python3 -c '
            import json, sys
            d = json.load(sys.stdin)
            print(d["stats"]["total_bytes"], d["stats"]["total_used_bytes"])
            for p in d["pools"]:
                print(p["name"], p["stats"]["stored"])
            '
            """)
        let lines = out.split(separator: "\n")
        let totals = lines[0].split(separator: " ").map { UInt64($0)! }
        var pools: [String: UInt64] = [:]
        for line in lines.dropFirst() {
            let fields = line.split(separator: " ")
            pools[String(fields[0])] = UInt64(fields[1])
        }
        return (totals[0], totals[1], pools)
    }

    /// Within 10% of each other (plus `slack` bytes): two reads of figures that keep changing.
    static func near(_ a: UInt64, _ b: UInt64, slack: UInt64 = 0) -> Bool {
        let (low, high) = (min(a, b), max(a, b))
        return high - low <= high / 10 + slack
    }
}
