import Foundation
import Testing

/// Bad input (issue 6, item 6): every case gets a clear errno (the raw errno, from Python's os module), the
/// daemon's log (`<mount>.log`, --log-level debug) has a line naming the operation, the name and the errno
/// with the reason, and nothing changes in the cluster (checked with `rbd ls`, `rbd snap ls`, `rbd children`
/// and `rbd export`). ConventionsTests covers several of these refusals for their errno; here the point is
/// the log line and "changes nothing".
@Suite(.enabled(if: Environment.isReady, Environment.skipReason))
struct BadInputTests {
    init() { Environment.printSkipReasonOnce() }

    // MARK: - Names

    @Test func atSignsInTheWrongPlaceAreEINVAL() throws {
        let fixture = try BadInputImage("bad-at")
        defer { fixture.remove() }
        let mount = try MountedRBDFS()
        let base = fixture.name
        let cases = [("@\(base)", "a snapshot needs an image name before '@'"),
                     ("\(base)@", "a snapshot needs a name after '@'"),
                     ("\(base)@b@c", "more than one '@'")]
        for (name, reason) in cases {
            #expect(try pythonErrno("os.close(os.open(\(pyQuote(mount.path + "/images/" + name)), os.O_CREAT | os.O_WRONLY | os.O_EXCL))") == "errno 22", "\(name)")
            #expect(try pythonErrno("os.link(\(pyQuote(mount.path + "/images/" + base)), \(pyQuote(mount.path + "/images/" + name)))") == "errno 22", "ln \(name)")
            #expect(mount.logHasLine("lookup \(name): ", "invalid name", reason, "[errno 22]"), "no log line for \(name) in \(mount.logFile)")
        }
        try fixture.expectUnchanged()
        #expect(try RBDCLI.list("images").filter { $0.contains(base) } == [base])
    }

    @Test func namesOf96BytesAreENAMETOOLONG() throws {
        let fixture = try BadInputImage("bad-long")
        defer { fixture.remove() }
        let mount = try MountedRBDFS()
        let longImage = fixture.name + String(repeating: "x", count: 96 - fixture.name.utf8.count)
        let longSnapshot = String(repeating: "s", count: 96)
        #expect(longImage.utf8.count == 96)
        #expect(try pythonErrno("os.close(os.open(\(pyQuote(mount.path + "/images/" + longImage)), os.O_CREAT | os.O_WRONLY))") == "errno 36")
        #expect(mount.logHasLine("lookup \(longImage): ", "name longer than 95 bytes", "[errno 36]"), "\(mount.logFile)")
        // A snapshot name has the same limit: `ln img img@<96 bytes>` takes no snapshot.
        let snapshotFile = "\(fixture.name)@\(longSnapshot)"
        #expect(try pythonErrno("os.link(\(pyQuote(mount.path + "/images/" + fixture.name)), \(pyQuote(mount.path + "/images/" + snapshotFile)))") == "errno 36")
        #expect(mount.logHasLine("lookup \(snapshotFile): ", "name longer than 95 bytes", "[errno 36]"), "\(mount.logFile)")
        try fixture.expectUnchanged()
        #expect(try RBDCLI.list("images").filter { $0.hasPrefix(fixture.name) } == [fixture.name])
    }

    @Test func anUnknownSnapshotIsENOENT() throws {
        let fixture = try BadInputImage("bad-nosnap")
        defer { fixture.remove() }
        let mount = try MountedRBDFS()
        let file = mount.path + "/images/\(fixture.name)@nope"
        #expect(try pythonErrno("os.stat(\(pyQuote(file)))") == "errno 2")
        #expect(try pythonErrno("os.open(\(pyQuote(file)), os.O_RDONLY)") == "errno 2")
        // Logged at debug level only: a lookup of a missing name is routine (shells, `cp` probing targets).
        #expect(mount.logHasLine("lookup \(fixture.name)@nope: ", "no such pool, namespace, image or snapshot", "[errno 2]"), "\(mount.logFile)")
        // Creating it would be a Glance upload onto an existing image: EEXIST, and no snapshot either.
        #expect(try pythonErrno("os.close(os.open(\(pyQuote(file)), os.O_CREAT | os.O_WRONLY))") == "errno 17")
        #expect(mount.logHasLine("create \(fixture.name)@nope: ", "already exists", "[errno 17]"), "\(mount.logFile)")
        try fixture.expectUnchanged()
    }

    // MARK: - Snapshots are read-only

    @Test func writingOrTruncatingASnapshotIsEROFS() throws {
        let fixture = try BadInputImage("bad-rosnap", snapshot: "s")
        defer { fixture.remove() }
        let mount = try MountedRBDFS()
        let snapshot = mount.path + "/images/\(fixture.name)@s"
        #expect(try pythonErrno("os.open(\(pyQuote(snapshot)), os.O_WRONLY)") == "errno 30")
        #expect(try pythonErrno("os.open(\(pyQuote(snapshot)), os.O_RDWR)") == "errno 30")
        #expect(mount.logHasLine("open: images/\(fixture.name)@s: read-only: snapshots are read-only [errno 30]"), "\(mount.logFile)")
        #expect(try pythonErrno("os.truncate(\(pyQuote(snapshot)), 0)") == "errno 30")
        #expect(try pythonErrno("os.truncate(\(pyQuote(snapshot)), 8 << 20)") == "errno 30")
        #expect(mount.logHasLine("setattr: images/\(fixture.name)@s: read-only: snapshots are read-only [errno 30]"), "\(mount.logFile)")
        try fixture.expectUnchanged()
        #expect(try RBDCLI.exportEquals("images/\(fixture.name)@s", fixture.source))
    }

    // MARK: - Gestures RBD has no meaning for

    @Test func symlinkIsEPERM() throws {
        let fixture = try BadInputImage("bad-symlink")
        defer { fixture.remove() }
        let mount = try MountedRBDFS()
        let link = "\(fixture.name)-link"
        #expect(try pythonErrno("os.symlink(\(pyQuote(mount.path + "/images/" + fixture.name)), \(pyQuote(mount.path + "/images/" + link)))") == "errno 1")
        #expect(mount.logHasLine("symlink \(link): ", "RBD has no symbolic links", "[errno 1]"), "\(mount.logFile)")
        #expect(try RBDCLI.list("images").filter { $0.hasPrefix(fixture.name) } == [fixture.name])
        try fixture.expectUnchanged()
    }

    /// The kernel answers this one itself: its lookup finds the image, so mkdir never reaches the daemon and
    /// there is no log line to look for.
    @Test func mkdirOverAnImageIsEEXIST() throws {
        let fixture = try BadInputImage("bad-mkdir")
        defer { fixture.remove() }
        let mount = try MountedRBDFS()
        #expect(try pythonErrno("os.mkdir(\(pyQuote(mount.path + "/images/" + fixture.name)))") == "errno 17")
        let namespaces = try sh("rbd namespace ls --format json images")
        #expect(!namespaces.contains("\"\(fixture.name)\""), "\(namespaces)")
        try fixture.expectUnchanged()
        #expect(try sh("stat -c %F \(mount.q("images/\(fixture.name)"))").hasPrefix("regular"))
    }

    @Test func renameOntoAnExistingImageOrSnapshotIsEEXIST() throws {
        let a = try BadInputImage("bad-mva", snapshot: "s")
        defer { a.remove() }
        let b = try BadInputImage("bad-mvb")
        defer { b.remove() }
        try sh("rbd snap create images/\(a.name)@t")
        let mount = try MountedRBDFS()
        let images = mount.path + "/images/"
        #expect(try pythonErrno("os.rename(\(pyQuote(images + a.name)), \(pyQuote(images + b.name)))") == "errno 17")
        #expect(mount.logHasLine("rename \(a.name) to \(b.name): images/\(b.name): already exists [errno 17]"), "\(mount.logFile)")
        #expect(try pythonErrno("os.rename(\(pyQuote(images + a.name + "@s")), \(pyQuote(images + a.name + "@t")))") == "errno 17")
        #expect(mount.logHasLine("rename \(a.name)@s to \(a.name)@t: ", "already exists [errno 17]"), "\(mount.logFile)")
        #expect(try RBDCLI.exportEquals("images/\(a.name)", a.source))
        #expect(try RBDCLI.exportEquals("images/\(b.name)", b.source))
        #expect(try RBDCLI.snapshots("images/\(a.name)") == ["s": "false", "t": "false"])
        #expect(try RBDCLI.exportEquals("images/\(a.name)@s", a.source))
        #expect(try RBDCLI.snapshots("images/\(b.name)").isEmpty)
    }

    // MARK: - Safety rules

    @Test func shrinkingOverDataWithoutAllowShrinkIsEPERM() throws {
        let fixture = try BadInputImage("bad-shrink")
        defer { fixture.remove() }
        let mount = try MountedRBDFS()
        let file = mount.path + "/images/\(fixture.name)"
        #expect(try pythonErrno("os.truncate(\(pyQuote(file)), 4096)") == "errno 1")
        #expect(try pythonErrno("fd = os.open(\(pyQuote(file)), os.O_RDWR); os.ftruncate(fd, 0)") == "errno 1")
        #expect(mount.logHasLine("setattr: images/\(fixture.name): refused: shrinking from \(BadInputImage.size) to 4096 bytes would discard data", "allow_shrink", "[errno 1]"), "\(mount.logFile)")
        #expect(try sh("stat -c %s \(shellQuote(file))").trimmed == "\(BadInputImage.size)")
        try fixture.expectUnchanged()
    }

    @Test func rmOfASnapshotWithClonesIsEBUSY() throws {
        let fixture = try BadInputImage("bad-rmsnap", snapshot: "s")
        let clone = "\(fixture.name)-clone"
        defer {
            RBDCLI.purge(["vms/\(clone)"])
            fixture.remove()
        }
        try sh("rbd snap protect images/\(fixture.name)@s && rbd clone images/\(fixture.name)@s vms/\(clone)")
        let mount = try MountedRBDFS()
        #expect(try pythonErrno("os.unlink(\(pyQuote(mount.path + "/images/\(fixture.name)@s")))") == "errno 16")
        #expect(mount.logHasLine("unlink \(fixture.name)@s: ", "busy: in use by 1 clone(s): vms/\(clone)", "[errno 16]"), "\(mount.logFile)")
        #expect(try RBDCLI.snapshots("images/\(fixture.name)") == ["s": "true"])
        #expect(try RBDCLI.children("images/\(fixture.name)@s") == ["vms/\(clone)"])
        #expect(try RBDCLI.exportEquals("images/\(fixture.name)@s", fixture.source))
        #expect(try RBDCLI.exportEquals("vms/\(clone)", fixture.source))
        try fixture.expectUnchanged(snapshots: ["s": "true"])
    }

    @Test func rmOfAnImageWithSnapshotsIsENOTEMPTY() throws {
        let fixture = try BadInputImage("bad-rmimg", snapshot: "keep")
        defer { fixture.remove() }
        let mount = try MountedRBDFS()
        #expect(try pythonErrno("os.unlink(\(pyQuote(mount.path + "/images/\(fixture.name)")))") == "errno 39")
        #expect(mount.logHasLine("unlink \(fixture.name): ", "images/\(fixture.name)", "[errno 39]"), "\(mount.logFile)")
        #expect(try RBDCLI.list("images").contains(fixture.name))
        #expect(try RBDCLI.exportEquals("images/\(fixture.name)@keep", fixture.source))
        try fixture.expectUnchanged(snapshots: ["keep": "false"])
    }

    @Test func rmdirOfAPoolThatHoldsAnImageIsENOTEMPTY() throws {
        let pool = uniqueName("badpool")
        try createRBDPool(pool)
        try sh("rbd create \(pool)/img --size 1M")
        defer { _ = try? run("rbd rm --no-progress \(pool)/img; ceph osd pool rm \(pool) \(pool) --yes-i-really-really-mean-it") }
        let mount = try MountedRBDFS(["--allow-pool-delete"])
        #expect(try pythonErrno("os.rmdir(\(pyQuote(mount.path + "/" + pool)))") == "errno 39")
        #expect(mount.logHasLine("rmdir \(pool): \(pool): not empty: 1 image(s), 0 namespace(s) [errno 39]"), "\(mount.logFile)")
        #expect(try sh("ceph osd pool ls").split(separator: "\n").contains(Substring(pool)))
        #expect(try RBDCLI.list(pool) == ["img"])
        mount.unmount()
    }

    // MARK: - Mounting

    @Test func mountingAMissingPoolFailsWithAMessageAndLeavesNothing() throws {
        let work = try ReliabilityScratch(uniqueName("bad-mountpool"))
        let pool = uniqueName("no-such-pool")
        try sh("mkdir -p \(work.q("mnt"))")
        let result = try run("""
            \(shellQuote(Environment.binary!)) mount \(work.q("mnt")) --conf \(shellQuote(Environment.cephConf!)) \
            --pool \(pool) --log-file \(work.q("mnt.log")) --log-level debug
            """, timeout: 60)
        #expect(!result.succeeded)
        #expect(result.stderr.contains("pool '\(pool)' does not exist"), "\(result.stderr)")
        let log = (try? String(contentsOfFile: work.file("mnt.log"), encoding: .utf8)) ?? ""
        #expect(log.split(separator: "\n").filter { $0.contains("mount failed: pool '\(pool)' does not exist") }.count == 1, "\(log)")
        #expect(!((try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? "").contains(work.file("mnt")))
        #expect(eventually(within: 5) { !((try? run("pgrep -f -- '[r]bdfs mount \(work.file("mnt")) '"))?.succeeded ?? false) })
        #expect(!(try sh("ceph osd pool ls")).split(separator: "\n").contains(Substring(pool)))
    }
}

/// An image of 2 MiB + 77 random bytes (optionally with one snapshot of them), made with the rbd CLI, and what
/// it holds, to check that a refused operation changed nothing.
private final class BadInputImage {
    static let size = 2 * 1024 * 1024 + 77

    let name: String
    let work: ReliabilityScratch
    let snapshot: String?
    var source: String { work.file("src") }

    init(_ prefix: String, snapshot: String? = nil) throws {
        name = uniqueName(prefix)
        self.snapshot = snapshot
        work = try ReliabilityScratch(name)
        try sh("head -c \(Self.size) /dev/urandom > \(work.q("src")) && rbd import --no-progress \(work.q("src")) images/\(name)")
        if let snapshot { try sh("rbd snap create images/\(name)@\(snapshot)") }
    }

    /// Same size, same bytes, same snapshots (default: the one it was made with, unprotected).
    func expectUnchanged(snapshots: [String: String]? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let expected = snapshots ?? (snapshot.map { [$0: "false"] } ?? [:])
        #expect(try RBDCLI.size("images/\(name)") == UInt64(Self.size), sourceLocation: sourceLocation)
        #expect(try RBDCLI.exportEquals("images/\(name)", source), sourceLocation: sourceLocation)
        #expect(try RBDCLI.snapshots("images/\(name)") == expected, sourceLocation: sourceLocation)
    }

    func remove() { RBDCLI.purge(["images/\(name)"]) }
}
