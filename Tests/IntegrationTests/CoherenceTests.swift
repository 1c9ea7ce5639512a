import Foundation
import Testing

/// Changes made by other clients (the rbd CLI) while the mount has the image open, and our own changes the
/// kernel would otherwise show late. Most mounts here keep names and attributes for 30 s (`--attr-timeout`),
/// so that only librbd's update watch and the kernel invalidations can make a change show within the 3 s the
/// tests allow: without them these tests fail.
@Suite(.enabled(if: Environment.isReady, Environment.skipReason))
struct CoherenceTests {
    init() { Environment.printSkipReasonOnce() }

    let mib: Int64 = 1 << 20
    /// O_DIRECT, which Glibc shows Swift only with _GNU_SOURCE.
    #if arch(arm64)
    let oDirect: Int32 = 0o200000
    #else
    let oDirect: Int32 = 0o40000
    #endif

    /// The size fstat(2) reports for an open descriptor (-errno on failure).
    func fileSize(_ fd: Int32) -> Int64 {
        var st = Glibc.stat()
        guard fstat(fd, &st) == 0 else { return -Int64(errno) }
        return Int64(st.st_size)
    }

    /// pread(2) of `count` bytes at `offset` as a string, or the errno.
    func readString(_ fd: Int32, at offset: Int64, count: Int) -> Result<String, POSIXError> {
        var buffer = [UInt8](repeating: 0, count: count)
        let got = pread(fd, &buffer, count, off_t(offset))
        guard got >= 0 else { return .failure(POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)) }
        return .success(String(decoding: buffer[0..<got], as: UTF8.self))
    }

    @Test func anOpenImageHearsResizesAndSnapshotsByTheRbdCLIAtOnce() throws {
        let image = uniqueName("watched")
        try sh("rbd create images/\(image) --size 4M && rbd snap create images/\(image)@early")
        defer { _ = try? run("rbd snap purge images/\(image) >/dev/null 2>&1; rbd rm images/\(image)") }
        let mount = try MountedRBDFS(["--attr-timeout", "30"])
        let path = mount.path + "/images/\(image)"
        let fd = open(path, O_RDONLY)
        try #require(fd >= 0)
        defer { close(fd) }
        // The kernel now holds the file's attributes, the snapshot's name and the listing's details for 30 s.
        #expect(fileSize(fd) == 4 * mib)
        #expect(try sh("stat -c %s \(mount.q("images/\(image)@early"))").trimmed == "\(4 * mib)")

        try sh("rbd resize images/\(image) --size 12M")
        #expect(eventually(within: 3) { fileSize(fd) == 12 * mib }, "fstat of the open file: \(fileSize(fd))")
        #expect(try sh("stat -c %s \(shellQuote(path))").trimmed == "\(12 * mib)")

        try sh("rbd snap create images/\(image)@newsnap")
        #expect(try eventually(within: 3) { (try run("stat \(mount.q("images/\(image)@newsnap"))")).succeeded })
        #expect(try sh("stat -c %s \(mount.q("images/\(image)@newsnap"))").trimmed == "\(12 * mib)")
        #expect(try sh("ls \(mount.q("images"))").split(separator: "\n").contains("\(image)@newsnap"))

        try sh("rbd snap rm images/\(image)@early")
        #expect(try eventually(within: 3) { !(try run("stat \(mount.q("images/\(image)@early"))")).succeeded },
                "a snapshot removed elsewhere must not linger as a name")

        // A shrink: the size, and the pages past the new end, go at once.
        try sh("rbd resize images/\(image) --size 2M --allow-shrink")
        #expect(eventually(within: 3) { fileSize(fd) == 2 * mib }, "fstat of the open file: \(fileSize(fd))")
        #expect(try readString(fd, at: 3 * mib, count: 4096).get().isEmpty)
    }

    @Test func aCloneThroughTheMountShowsInTheSnapshotsLinkCountAtOnce() throws {
        let image = uniqueName("nlink")
        let child = uniqueName("nlinkchild")
        try sh("rbd create images/\(image) --size 4M && rbd snap create images/\(image)@s && rbd snap protect images/\(image)@s")
        defer {
            _ = try? run("rbd rm images/\(child) >/dev/null 2>&1; rbd snap unprotect images/\(image)@s; rbd snap purge images/\(image); rbd rm images/\(image)")
        }
        let mount = try MountedRBDFS(["--attr-timeout", "30"])
        let snap = mount.q("images/\(image)@s")
        #expect(try sh("stat -c %h \(snap)").trimmed == "1")
        try sh("ln \(snap) \(mount.q("images/\(child)"))")
        #expect(try eventually(within: 3) { try sh("stat -c %h \(snap)").trimmed == "2" })
        try sh("rm \(mount.q("images/\(child)"))")
        #expect(try eventually(within: 3) { try sh("stat -c %h \(snap)").trimmed == "1" })
    }

    /// librbd 16.2: `rbd rm` refuses an image rbdfs has open ("image still has watchers", EBUSY), but
    /// `rbd trash mv` takes it away and no update reaches the watch; a new image may then take the name.
    /// Files open on the old image must never show the new one's data, and new opens must not show the old.
    @Test func anImageMovedToTheTrashAndReplacedWhileOpenIsNeverMixedUp() throws {
        let image = uniqueName("replaced")
        let work = NSTemporaryDirectory() + image
        try sh("mkdir -p \(work) && printf OLDDATA! > \(work)/old && printf NEWDATA! > \(work)/new && rbd import --no-progress \(work)/old images/\(image)")
        defer {
            _ = try? run("""
                for id in $(rbd trash ls images | awk '$2 == "\(image)" {print $1}'); do rbd trash rm images/$id; done
                rbd rm images/\(image); rm -rf \(work)
                """)
        }
        let mount = try MountedRBDFS()
        let path = mount.path + "/images/\(image)"
        let fd = open(path, O_RDONLY)
        try #require(fd >= 0)
        var closed = false
        defer { if !closed { close(fd) } }
        #expect(try readString(fd, at: 0, count: 8).get() == "OLDDATA!")

        let refused = try run("rbd rm images/\(image)")
        #expect(!refused.succeeded && refused.stderr.contains("watchers"), "\(refused.stderr)")
        #expect(try readString(fd, at: 0, count: 8).get() == "OLDDATA!")

        try sh("rbd trash mv images/\(image) && rbd import --no-progress \(work)/new images/\(image)")
        // New opens of the name reach the new image (within the 1 s the names and attributes are kept) ...
        #expect(try eventually(within: 3) { try sh("head -c 8 \(shellQuote(path))") == "NEWDATA!" })
        #expect(try sh("head -c 8 \(shellQuote(path))") == "NEWDATA!")
        // ... and the descriptor open on the old one is stale: never the new image's bytes.
        #expect(eventually(within: 3) { fileSize(fd) == -Int64(ESTALE) }, "fstat of the old file: \(fileSize(fd))")
        switch readString(fd, at: 0, count: 8) {
        case .success(let text): #expect(text == "OLDDATA!", "the old file read \(text)")
        case .failure(let error): #expect(error.code == .ESTALE)
        }

        // Closed, then removed: the name is gone, then comes back with the next image of that name.
        close(fd)
        closed = true
        try sh("rbd trash rm images/$(rbd trash ls images | awk '$2 == \"\(image)\" {print $1}')")
        #expect(try eventually(within: 3) { (try run("rbd rm images/\(image)")).succeeded })
        #expect(try eventually(within: 3) { !(try run("test -e \(shellQuote(path))")).succeeded })
        try sh("rbd import --no-progress \(work)/old images/\(image)")
        #expect(try eventually(within: 3) { (try? sh("head -c 8 \(shellQuote(path))")) == "OLDDATA!" })
    }

    /// A `--read-only` mount opens images read-only: no watch, so `rbd rm` succeeds while a file is open.
    /// librbd then reads the removed image as zeros; rbdfs finds it out within about a second (ESTALE).
    @Test func anImageRemovedWhileOpenInAReadOnlyMountAnswersESTALE() throws {
        let image = uniqueName("rogone")
        let work = NSTemporaryDirectory() + image
        try sh("mkdir -p \(work) && printf OLDDATA! > \(work)/old && rbd import --no-progress \(work)/old images/\(image)")
        defer { _ = try? run("rbd rm images/\(image) >/dev/null 2>&1; rm -rf \(work)") }
        let mount = try MountedRBDFS(["--read-only"])
        let direct = open(mount.path + "/images/\(image)", O_RDONLY | oDirect)
        try #require(direct >= 0)
        defer { close(direct) }
        let block = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { block.deallocate() }
        #expect(pread(direct, block, 4096, 0) == 8)
        try sh("rbd rm images/\(image)")
        #expect(eventually(within: 3) { pread(direct, block, 4096, 0) < 0 && errno == ESTALE })
        #expect(fileSize(direct) == -Int64(ESTALE))
        #expect(!(try run("test -e \(mount.q("images/\(image)"))")).succeeded)
    }

    /// Snapshots are opened read-only, which in librbd means no watch: a snapshot removed and made again
    /// elsewhere under the same name is found out by the check of unwatched images (once a second), or when
    /// its name or attributes are next asked for.
    @Test func aSnapshotRemadeElsewhereWhileOpenIsNeverMixedUp() throws {
        let image = uniqueName("resnap")
        let work = NSTemporaryDirectory() + image
        try sh("""
            mkdir -p \(work) && printf OLDDATA! > \(work)/old && printf NEWDATA! > \(work)/new \
            && rbd import --no-progress \(work)/old images/\(image) && rbd snap create images/\(image)@s
            """)
        defer { _ = try? run("rbd snap purge images/\(image); rbd rm images/\(image); rm -rf \(work)") }
        let mount = try MountedRBDFS()
        let path = mount.path + "/images/\(image)@s"
        let fd = open(path, O_RDONLY)
        try #require(fd >= 0)
        defer { close(fd) }
        // O_DIRECT: every read reaches rbdfs, none is answered from the kernel's pages.
        let direct = open(path, O_RDONLY | oDirect)
        try #require(direct >= 0)
        defer { close(direct) }
        let block = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { block.deallocate() }
        #expect(try readString(fd, at: 0, count: 8).get() == "OLDDATA!")
        #expect(pread(direct, block, 4096, 0) == 8)
        // Removed, the head rewritten (through the mount: another node than the snapshot's), taken again.
        try sh("rbd snap rm images/\(image)@s")
        try sh("printf NEWDATA! | dd of=\(mount.q("images/\(image)")) conv=notrunc status=none")
        try sh("rbd snap create images/\(image)@s")
        // Nothing looks at the name: the check of unwatched images alone finds it out, within about a second.
        #expect(eventually(within: 3) { pread(direct, block, 4096, 0) < 0 && errno == ESTALE })
        #expect(try eventually(within: 3) { try sh("head -c 8 \(shellQuote(path))") == "NEWDATA!" })
        #expect(eventually(within: 3) { fileSize(fd) == -Int64(ESTALE) }, "fstat of the old snapshot file: \(fileSize(fd))")
        switch readString(fd, at: 0, count: 8) {
        case .success(let text): #expect(text == "OLDDATA!", "the old snapshot file read \(text)")
        case .failure(let error): #expect(error.code == .ESTALE)
        }
    }
}
