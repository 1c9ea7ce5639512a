import Foundation
import Testing

/// What fsync, fdatasync, close, SIGTERM and `rbdfs unmount` acknowledge is in RBD (issue 6, item 1;
/// SEMANTICS.md "What fsync acknowledged is in the cluster").
///
/// The hard cases kill the daemon with SIGKILL right after the acknowledgement: nothing held in rbdfs or
/// librbd survives that, so whatever `rbd export` shows afterwards was in the cluster when fsync
/// returned. Each write is random data that crosses an object boundary, and some pass the image's end (so
/// the growth step must be trimmed by the fsync too: `rbd info` must show exactly the bytes written).
///
/// librbd keeps its cache write-through until it sees the first flush (`rbd_cache_writethrough_until_flush`,
/// on by default), so the Python writers fsync once right after open: from then on librbd acknowledges
/// writes before they reach the OSDs (`rbd_cache_policy = writearound`), and only the final fsync makes them
/// durable. (Seen here: the same 12 MiB write with that priming fsync but no final one, then SIGKILL, lost
/// 3 MiB in one run of three.)
@Suite(.enabled(if: Environment.isReady, Environment.skipReason))
struct DurabilityTests {
    init() { Environment.printSkipReasonOnce() }

    static let mib = 1 << 20

    // MARK: - fsync / fdatasync, then SIGKILL

    /// The everyday tool: `dd conv=notrunc,fsync`. (dd's fsync is also librbd's first flush, so this one
    /// checks the plain path; the Python cases below are the sharp ones.)
    @Test func ddWithFsyncSurvivesSigkillOfTheDaemon() throws {
        let image = uniqueName("dur-dd")
        let work = try ReliabilityScratch(image)
        defer { RBDCLI.purge(["images/\(image)"]) }
        // 16 MiB of random data already in the image; dd replaces 5 MiB + 77 bytes across two object boundaries.
        try sh("head -c \(16 * Self.mib) /dev/urandom > \(work.q("expected")) && rbd import --no-progress \(work.q("expected")) images/\(image)")
        let mount = try MountedRBDFS()
        defer { mount.detachDeadMount() }
        let offset = 3 * Self.mib + 4097, length = 5 * Self.mib + 77
        try sh("head -c \(length) /dev/urandom > \(work.q("patch"))")
        try sh("dd if=\(work.q("patch")) of=\(mount.q("images/\(image)")) bs=1M seek=\(offset) oflag=seek_bytes conv=notrunc,fsync status=none")
        try sh("kill -9 \(try mount.daemonPID())")
        mount.detachDeadMount()
        try sh("dd if=\(work.q("patch")) of=\(work.q("expected")) bs=1M seek=\(offset) oflag=seek_bytes conv=notrunc status=none")
        #expect(try RBDCLI.exportEquals("images/\(image)", work.file("expected")))
        #expect(try RBDCLI.size("images/\(image)") == UInt64(16 * Self.mib))
    }

    /// `os.write` + `os.fsync` (or `os.fdatasync`) on a descriptor that stays open; the daemon is killed by the
    /// writer itself the moment the call returns, so no close (and no FUSE flush or release) ever reaches it.
    @Test(arguments: ["fsync", "fdatasync"])
    func writeThenSyncOnAnOpenDescriptorSurvivesSigkill(_ sync: String) throws {
        let image = uniqueName("dur-\(sync)")
        let work = try ReliabilityScratch(image)
        defer { RBDCLI.purge(["images/\(image)"]) }
        try sh("head -c \(10 * Self.mib) /dev/urandom > \(work.q("base")) && rbd import --no-progress \(work.q("base")) images/\(image)")
        let mount = try MountedRBDFS()
        defer { mount.detachDeadMount() }
        let pid = try mount.daemonPID()
        // Three writes: one inside, one across the 4 MiB and 8 MiB boundaries, one past the end (10 MiB) to
        // 13 MiB + 5 — the image must end exactly there after the sync, not at the growth step.
        let writes = [(100, 4096), (4 * Self.mib - 300, 4 * Self.mib + 600), (9 * Self.mib + 12345, 4 * Self.mib - 12340)]
        let output = try sh("""
            python3 - <<'PY'
            import os, signal
            base = open(\(pyQuote(work.file("base"))), 'rb').read()
            expected = bytearray(base)
            fd = os.open(\(pyQuote(mount.path + "/images/\(image)")), os.O_RDWR)
            os.fsync(fd)  # librbd's first flush: its cache leaves write-through mode
            for offset, length in [\(writes.map { "(\($0.0), \($0.1))" }.joined(separator: ", "))]:
                data = os.urandom(length)
                os.lseek(fd, offset, os.SEEK_SET)
                assert os.write(fd, data) == length
                end = offset + length
                if end > len(expected):
                    expected.extend(bytes(end - len(expected)))
                expected[offset:end] = data
            os.\(sync)(fd)
            os.kill(\(pid), signal.SIGKILL)
            open(\(pyQuote(work.file("expected"))), 'wb').write(expected)
            print(len(expected))
            PY
            """)
        mount.detachDeadMount()
        #expect(output.trimmed == "\(13 * Self.mib + 5)")
        #expect(!mount.daemonIsRunning)
        #expect(try RBDCLI.size("images/\(image)") == UInt64(13 * Self.mib + 5))
        #expect(try RBDCLI.exportEquals("images/\(image)", work.file("expected")))
    }

    /// A file made through the mount (O_CREAT: rbdfs tracks its objects and skips zero writes into unwritten
    /// ones), written, fsynced, then SIGKILL.
    @Test func aNewImageWrittenAndFsyncedSurvivesSigkill() throws {
        let image = uniqueName("dur-new")
        let work = try ReliabilityScratch(image)
        defer { RBDCLI.purge(["images/\(image)"]) }
        let mount = try MountedRBDFS()
        defer { mount.detachDeadMount() }
        let pid = try mount.daemonPID()
        // Random data with zeros over all of the second object (skipped, as never written): 9 MiB + 3 bytes.
        try sh("""
            { head -c \(3 * Self.mib) /dev/urandom; head -c \(5 * Self.mib) /dev/zero; head -c \(Self.mib + 3) /dev/urandom; } > \(work.q("expected"))
            """)
        try sh("""
            python3 - <<'PY'
            import os, signal
            data = open(\(pyQuote(work.file("expected"))), 'rb').read()
            fd = os.open(\(pyQuote(mount.path + "/images/\(image)")), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            os.fsync(fd)  # librbd's first flush: its cache leaves write-through mode
            for offset in range(0, len(data), 1 << 20):
                chunk = data[offset:offset + (1 << 20)]
                assert os.write(fd, chunk) == len(chunk)
            os.fsync(fd)
            os.kill(\(pid), signal.SIGKILL)
            PY
            """)
        mount.detachDeadMount()
        #expect(!mount.daemonIsRunning)
        #expect(try RBDCLI.size("images/\(image)") == UInt64(9 * Self.mib + 3))
        #expect(try RBDCLI.exportEquals("images/\(image)", work.file("expected")))
    }

    // MARK: - fio write + verify, across a remount

    /// fio writes 64 MiB in random 64 KiB blocks with crc32c verify headers (O_DIRECT, libaio, 8 in flight) and
    /// reads them all back; after an unmount and a fresh mount a `verify_only` pass (same job, same seed)
    /// checks every block again, and so does one on the `rbd export` of the image. A block corrupted on
    /// purpose in a copy of the export must fail that last check, so the check is known to be real.
    @Test func fioRandomWriteVerifiesAndVerifiesAgainAfterARemount() throws {
        let image = uniqueName("dur-fio")
        let work = try ReliabilityScratch(image)
        try sh("rbd create images/\(image) --size 64M")
        defer { RBDCLI.purge(["images/\(image)"]) }
        let seed = UInt32.random(in: 1...UInt32.max)
        print("DurabilityTests fio: --randseed=\(seed)")
        let job = "--name=v --rw=randwrite --bs=64k --size=64M --verify=crc32c --verify_fatal=1 --randseed=\(seed) --output-format=json"
        let direct = "--ioengine=libaio --iodepth=8 --direct=1"
        do {
            let mount = try MountedRBDFS()
            defer { mount.unmount() }
            let written = try Self.fio("\(job) \(direct) --do_verify=1 --filename=\(mount.q("images/\(image)"))")
            #expect(written.error == 0 && written.writeBytes == 64 << 20 && written.readBytes == 64 << 20, "\(written)")
        }
        do {
            let mount = try MountedRBDFS()
            defer { mount.unmount() }
            let verified = try Self.fio("\(job) \(direct) --verify_only --filename=\(mount.q("images/\(image)"))")
            #expect(verified.error == 0 && verified.readBytes == 64 << 20, "\(verified)")
        }
        #expect(try RBDCLI.size("images/\(image)") == 64 << 20)
        try RBDCLI.export("images/\(image)", to: work.file("export"))
        let exported = try Self.fio("\(job) --ioengine=psync --verify_only --filename=\(work.q("export"))")
        #expect(exported.error == 0 && exported.readBytes == 64 << 20, "\(exported)")
        // The negative control: one 64 KiB block overwritten with random bytes.
        try sh("dd if=/dev/urandom of=\(work.q("export")) bs=64k seek=517 count=1 conv=notrunc status=none")
        let corrupted = try run("cd \(shellQuote(work.path)) && fio \(job) --ioengine=psync --verify_only --filename=\(work.q("export"))", timeout: 120)
        #expect(!corrupted.succeeded, "fio verify_only did not notice a corrupted block: \(corrupted.stdout)")
    }

    /// What one fio job did: its error and the bytes it read and wrote (from --output-format=json).
    struct FioResult: CustomStringConvertible {
        var error: Int
        var readBytes: Int
        var writeBytes: Int
        var output: String
        var description: String { "fio error \(error), read \(readBytes), written \(writeBytes): \(output.suffix(2000))" }
    }

    /// Runs fio (which must exit 0) and reads its JSON report. fio writes notes before the JSON; the report is
    /// from the first line that is just "{".
    static func fio(_ arguments: String) throws -> FioResult {
        let output = try sh("cd \(shellQuote(NSTemporaryDirectory())) && fio \(arguments)", timeout: 300)
        let json = output.range(of: "\n{\n").map { String(output[output.index(after: $0.lowerBound)...]) } ?? output
        let report = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
        let job = (report?["jobs"] as? [[String: Any]])?.first ?? [:]
        func number(_ value: Any?) -> Int { (value as? NSNumber)?.intValue ?? -1 }
        return FioResult(error: number(job["error"]), readBytes: number((job["read"] as? [String: Any])?["io_bytes"]),
                         writeBytes: number((job["write"] as? [String: Any])?["io_bytes"]), output: output)
    }

    // MARK: - No fsync: close, then SIGTERM or unmount

    /// Written and closed without fsync, then SIGTERM: the daemon flushes, unmounts and exits.
    @Test func writtenAndClosedThenSigtermIsInRBD() throws {
        let image = uniqueName("dur-term")
        let work = try ReliabilityScratch(image)
        defer { RBDCLI.purge(["images/\(image)"]) }
        try sh("head -c \(6 * Self.mib) /dev/urandom > \(work.q("expected")) && rbd import --no-progress \(work.q("expected")) images/\(image)")
        let mount = try MountedRBDFS()
        try sh("head -c \(3 * Self.mib + 1) /dev/urandom > \(work.q("patch"))")
        // No fsync: dd only closes. The patch, 3 MiB + 1 at 4 MiB, runs past the end: 6 MiB becomes 7 MiB + 1.
        try sh("dd if=\(work.q("patch")) of=\(mount.q("images/\(image)")) bs=1M seek=\(4 * Self.mib) oflag=seek_bytes conv=notrunc status=none")
        try sh("kill -TERM \(try mount.daemonPID())")
        #expect(eventually(within: 15) { !mount.isMounted && !mount.daemonIsRunning })
        try sh("dd if=\(work.q("patch")) of=\(work.q("expected")) bs=1M seek=\(4 * Self.mib) oflag=seek_bytes conv=notrunc status=none")
        #expect(try RBDCLI.size("images/\(image)") == UInt64(7 * Self.mib + 1))
        #expect(try RBDCLI.exportEquals("images/\(image)", work.file("expected")))
        #expect(mount.logHasLine("unmounted"))
    }

    /// Written without fsync and still open when SIGTERM comes: the daemon's shutdown must flush the open image
    /// and end (the connection held by the open file is aborted once the data is flushed).
    @Test func writtenStillOpenThenSigtermIsInRBD() throws {
        let image = uniqueName("dur-termopen")
        let work = try ReliabilityScratch(image)
        defer { RBDCLI.purge(["images/\(image)"]) }
        try sh("head -c \(8 * Self.mib) /dev/urandom > \(work.q("base")) && rbd import --no-progress \(work.q("base")) images/\(image)")
        let mount = try MountedRBDFS()
        defer { mount.detachDeadMount() }
        let pid = try mount.daemonPID()
        let output = try sh("""
            python3 - <<'PY'
            import os, signal, time
            expected = bytearray(open(\(pyQuote(work.file("base"))), 'rb').read())
            fd = os.open(\(pyQuote(mount.path + "/images/\(image)")), os.O_RDWR)
            os.fsync(fd)  # librbd's first flush: its cache leaves write-through mode
            data = os.urandom(3 << 20)
            assert os.pwrite(fd, data, (2 << 20) + 999) == len(data)
            expected[(2 << 20) + 999:(5 << 20) + 999] = data
            open(\(pyQuote(work.file("expected"))), 'wb').write(expected)
            def wait_for_exit(seconds):
                for _ in range(int(seconds * 20)):
                    if not os.path.exists('/proc/\(pid)'):
                        return True
                    time.sleep(0.05)
                return False
            os.kill(\(pid), signal.SIGTERM)
            if wait_for_exit(10):
                print("exited")
            else:
                # Still there with the descriptor open: close it, and see whether that lets the daemon go.
                print("still running 10 s after SIGTERM, mounted:", os.path.ismount(\(pyQuote(mount.path))))
                try:
                    os.close(fd)
                    print("close: ok")
                except OSError as e:
                    print("close: errno", e.errno)
                print("exited after close" if wait_for_exit(10) else "still running after close")
            PY
            """, timeout: 60)
        // The contract (SEMANTICS.md "Mounting"): SIGTERM flushes every open image and ends the daemon, open
        // files or not.
        #expect(output.trimmed == "exited", "daemon after SIGTERM with a file open: \(output) (log: \(mount.logFile))")
        #expect(!mount.daemonIsRunning)
        #expect(eventually(within: 5) { !mount.isMounted })
        #expect(try RBDCLI.exportEquals("images/\(image)", work.file("expected")))
    }

    /// Written and closed without fsync, then `rbdfs unmount`.
    @Test func writtenAndClosedThenUnmountIsInRBD() throws {
        let image = uniqueName("dur-umount")
        let work = try ReliabilityScratch(image)
        defer { RBDCLI.purge(["images/\(image)"]) }
        let mount = try MountedRBDFS()
        try sh("head -c \(5 * Self.mib + 4321) /dev/urandom > \(work.q("expected"))")
        try sh("cp \(work.q("expected")) \(mount.q("images/\(image)"))")
        mount.unmount()
        #expect(!mount.isMounted)
        #expect(eventually(within: 10) { !mount.daemonIsRunning })
        #expect(try RBDCLI.size("images/\(image)") == UInt64(5 * Self.mib + 4321))
        #expect(try RBDCLI.exportEquals("images/\(image)", work.file("expected")))
    }
}
