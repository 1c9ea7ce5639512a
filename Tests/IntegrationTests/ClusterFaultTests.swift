import Foundation
import Testing

/// A cluster of its own whose OSD keeps its data with BlueStore in a file (`scripts/cluster start --bluestore`),
/// so the OSD can be killed and started again with its data, and paused or fenced without stalling the shared
/// test cluster. Started on first use, stopped when the test process exits. Its folder,
/// /tmp/rbdfs-private-bs-PID, ends in the test process's pid like FaultAndSecurityTests' cluster's, so
/// scripts/test stops it if the process dies first; the mon's port is a free one the script picks, the OSD's
/// whatever free port it binds: two private clusters never share a folder or a port.
enum BlueStoreCluster {
    static let directory = "/tmp/rbdfs-private-bs-\(getpid())"
    static var conf: String { directory + "/ceph.conf" }
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path + "/scripts/cluster"

    /// Starts it once; false (with the reason printed) if it cannot start.
    static let started: Bool = {
        let result = try? IntegrationTests.run("RBDFS_CLUSTER_MGR=0 \(shellQuote(script)) start --dir \(directory) --bluestore", timeout: 240)
        guard let result, result.succeeded else {
            print("SKIP ClusterFaultTests: the private bluestore cluster did not start: \(result?.stderr.suffix(3000) ?? "scripts/cluster not runnable")")
            return false
        }
        stopCommand = strdup("\(shellQuote(script)) stop --dir \(directory) >/dev/null 2>&1")
        atexit {
            if let command = BlueStoreCluster.stopCommand { system(command) }
        }
        return true
    }()

    nonisolated(unsafe) static var stopCommand: UnsafeMutablePointer<CChar>?

    /// A command against this cluster (CEPH_CONF points at it).
    @discardableResult
    static func sh(_ command: String, timeout: Double = 120) throws -> String {
        try IntegrationTests.sh("export CEPH_CONF=\(conf); \(command)", timeout: timeout)
    }

    static func run(_ command: String, timeout: Double = 120) throws -> CommandResult {
        try IntegrationTests.run("export CEPH_CONF=\(conf); \(command)", timeout: timeout)
    }

    /// `scripts/cluster osd-stop --kill` or `osd-start` on this cluster.
    static func osd(_ action: String) throws {
        try sh("\(shellQuote(script)) \(action) --dir \(directory)", timeout: 120)
    }

    /// `ceph osd pause` / `unpause`. A client obeys the pause only once it has the new OSD map, which an idle
    /// client learns from the OSD's answer to its next operation: the flush writer sends a read first, so its
    /// write is held for certain.
    static func pauseOSDs(_ paused: Bool) throws {
        try sh("ceph osd \(paused ? "pause" : "unpause")")
    }

    /// Whether `rbd export` of images/IMAGE is byte-identical to `file`; prints where they differ otherwise.
    static func exportEquals(_ image: String, _ file: String) throws -> Bool {
        let result = try run("rbd export --no-progress images/\(image) - | cmp - \(shellQuote(file))", timeout: 300)
        if !result.succeeded { print("rbd export images/\(image) differs from \(file): \(result.stdout)\(result.stderr)") }
        return result.succeeded
    }

    /// Removes images/IMAGE; a watcher left by a fenced or killed client is blocklisted first.
    static func remove(_ image: String) {
        _ = try? run("""
            for w in $(rbd status --format json images/\(image) 2>/dev/null | python3 -c "import json,sys; [print(w['address']) for w in json.load(sys.stdin).get('watchers', [])]" 2>/dev/null); do
                ceph osd blocklist add "$w" 60 >/dev/null 2>&1
            done
            for i in $(seq 30); do rbd rm --no-progress images/\(image) >/dev/null 2>&1 && exit 0; sleep 1; done
            """, timeout: 120)
    }
}

/// Faults of a real cluster under a real mount (issue 6): an OSD killed and restarted in the middle of a write,
/// and flushes that fail after their writes were accepted. They run one at a time on a private cluster with a
/// BlueStore OSD (BlueStoreCluster), since they kill, pause and fence it.
@Suite(.serialized, .enabled(if: Environment.isReady, Environment.skipReason))
struct ClusterFaultTests {
    static let mib = 1 << 20

    func mount(_ arguments: [String] = []) throws -> MountedRBDFS {
        try MountedRBDFS(["--conf", BlueStoreCluster.conf] + arguments)
    }

    /// 32 MiB of random data written through the mount into a new image, 1 MiB at a time; after the first
    /// 8 MiB the OSD is killed (SIGKILL: a crash, the mon is not told), the writer goes on with the rest, and
    /// 4 s later the OSD is started again. The writer must not finish while the OSD is down (its fsync cannot
    /// be true then), must finish without an error once it is back, and `rbd export` must be the source, byte
    /// for byte. The mount must stay up and keep serving. (Seen here: the writes made while the OSD was dead
    /// were acknowledged at once by rbdfs's write-behind, up to its 64 MiB budget; the fsync then waited
    /// until the OSD was back.)
    @Test func aWriteRidesOutTheOsdBeingKilledAndRestarted() throws {
        try #require(BlueStoreCluster.started)
        let image = uniqueName("osdkill")
        let work = try ReliabilityScratch(image)
        defer { BlueStoreCluster.remove(image) }
        let mount = try self.mount()
        defer { mount.unmount() }
        let total = 32 * Self.mib
        try sh("head -c \(total) /dev/urandom > \(work.q("source"))")
        try """
            import os, time
            data = open(\(pyQuote(work.file("source"))), 'rb').read()
            fd = os.open(\(pyQuote(mount.path + "/images/" + image)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            step = 1 << 20
            for offset in range(0, len(data), step):
                assert os.write(fd, data[offset:offset + step]) == step
                if offset == 0:
                    os.fsync(fd)  # librbd's first flush: from here its cache acknowledges writes early
                if offset == 7 * step:
                    # A quarter written: the test kills the OSD now; the rest is written while it is dead.
                    open(\(pyQuote(work.file("quarter"))), 'w').close()
                    for _ in range(1200):
                        if os.path.exists(\(pyQuote(work.file("killed")))):
                            break
                        time.sleep(0.05)
                time.sleep(0.02)
            os.fsync(fd)
            os.close(fd)
            """.write(toFile: work.file("writer.py"), atomically: true, encoding: .utf8)
        try sh("(python3 \(work.q("writer.py")) > \(work.q("writer.out")) 2>&1; echo $? > \(work.q("writer.rc"))) >/dev/null 2>&1 &")
        #expect(eventually(within: 30) { FileManager.default.fileExists(atPath: work.file("quarter")) })
        defer { _ = try? BlueStoreCluster.osd("osd-start") }
        try BlueStoreCluster.osd("osd-stop --kill")
        FileManager.default.createFile(atPath: work.file("killed"), contents: nil)
        sleep(4)
        let finishedWhileDown = FileManager.default.fileExists(atPath: work.file("writer.rc"))
        try BlueStoreCluster.osd("osd-start")
        #expect(!finishedWhileDown, "the writer finished (fsync included) while the only OSD was dead: \((try? String(contentsOfFile: work.file("writer.out"), encoding: .utf8)) ?? "")")
        #expect(eventually(within: 90) { FileManager.default.fileExists(atPath: work.file("writer.rc")) }, "the writer did not finish after the OSD came back")
        let status = (try? String(contentsOfFile: work.file("writer.rc"), encoding: .utf8))?.trimmed
        let output = (try? String(contentsOfFile: work.file("writer.out"), encoding: .utf8)) ?? ""
        #expect(status == "0", "writer exit status \(status ?? "none"): \(output)")
        #expect(mount.isMounted && mount.daemonIsRunning, "the mount did not survive the OSD restart (log: \(mount.logFile))")
        #expect(try BlueStoreCluster.sh("rbd info --format json images/\(image)").contains("\"size\":\(total),"))
        #expect(try BlueStoreCluster.exportEquals(image, work.file("source")))
        // The mount still serves the image, from the cluster.
        #expect(try run("cmp \(mount.q("images/\(image)")) \(work.q("source"))").succeeded)
    }

    /// Runs the writer of the flush-failure tests in the background: it opens the image, writes and fsyncs
    /// 4 KiB (which takes the exclusive lock), waits while the test runs
    /// `beforeWrite` (the fault), writes 2 MiB more, which must be accepted, waits while the test runs
    /// `afterWrite`, then fsyncs and closes. Returns its exit status and one line per step ("write ok",
    /// "fsync errno N", "close ok"...).
    ///
    /// The faults are run from here, not from the writer: a process the writer started would inherit its
    /// descriptor, and the close of that copy at exec is a FUSE flush, which waits for the paused OSD.
    func runFlushWriter(_ path: String, in work: ReliabilityScratch, direct: Bool = false, beforeWrite: () throws -> Void,
                        afterWrite: () throws -> Void = {}) throws -> (status: String, lines: [String]) {
        try """
            import mmap, os, threading, time
            def wait_for(name):
                for _ in range(1200):
                    if os.path.exists(\(pyQuote(work.path)) + '/' + name):
                        return
                    time.sleep(0.05)
                raise SystemExit('no ' + name)
            def step(name, call, expected=None):
                try:
                    done = call()
                    if expected is not None and done != expected:
                        print(name, "short", done, flush=True)
                    else:
                        print(name, "ok", flush=True)
                except OSError as e:
                    print(name, "errno", e.errno, flush=True)
            fd = os.open(\(pyQuote(path)), os.O_RDWR)
            assert os.pwrite(fd, os.urandom(4096), 0) == 4096
            os.fsync(fd)
            if \(direct ? "True" : "False"):
                # O_DIRECT: an aligned buffer and offset, through a second descriptor of the same file, opened
                # before the fault (an open of a paused cluster's image waits too).
                direct_fd = os.open(\(pyQuote(path)), os.O_RDWR | os.O_DIRECT)
            open(\(pyQuote(work.file("ready"))), 'w').close()
            wait_for('faulted')
            # A read that reaches the OSD (O_DIRECT, past the page cache): its answer carries the OSD map with
            # the pause in it, which an idle client would otherwise learn only from the answer to the write.
            # If the client knew already, the read is held too: it is left behind in its thread after 2 s.
            def probe():
                try:
                    p = os.open(\(pyQuote(path)), os.O_RDONLY | os.O_DIRECT)
                    os.preadv(p, [mmap.mmap(-1, 4096)], 0)
                    os.close(p)
                except OSError:
                    pass
            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            prober.join(2)
            if \(direct ? "True" : "False"):
                data = mmap.mmap(-1, 2 << 20)
                data.write(os.urandom(2 << 20))
                step("write", lambda: os.pwritev(direct_fd, [data], 1 << 20), 2 << 20)
            else:
                data = os.urandom(2 << 20)
                step("write", lambda: os.pwrite(fd, data, (1 << 20) + 512), 2 << 20)
            open(\(pyQuote(work.file("written"))), 'w').close()
            wait_for('go')
            step("fsync", lambda: os.fsync(fd))
            step("close", lambda: os.close(fd))
            """.write(toFile: work.file("writer.py"), atomically: true, encoding: .utf8)
        try sh("(python3 \(work.q("writer.py")) > \(work.q("writer.out")) 2>&1; echo $? > \(work.q("writer.rc"))) >/dev/null 2>&1 &")
        func arrived(_ name: String) -> Bool {
            eventually(within: 60) { FileManager.default.fileExists(atPath: work.file(name)) || FileManager.default.fileExists(atPath: work.file("writer.rc")) }
        }
        func touch(_ name: String) { FileManager.default.createFile(atPath: work.file(name), contents: nil) }
        defer {
            touch("faulted")
            touch("go")
        }
        if arrived("ready") { try beforeWrite() }
        touch("faulted")
        if arrived("written") { try afterWrite() }
        touch("go")
        _ = eventually(within: 120) { FileManager.default.fileExists(atPath: work.file("writer.rc")) }
        let status = (try? String(contentsOfFile: work.file("writer.rc"), encoding: .utf8))?.trimmed ?? "still running"
        let output = (try? String(contentsOfFile: work.file("writer.out"), encoding: .utf8)) ?? ""
        return (status, output.split(separator: "\n").map(String.init))
    }

    /// With `--io-timeout 3`: a write acknowledged once librbd has it (write-behind; buffered, or O_DIRECT
    /// through a second descriptor), with the OSDs paused (`pauseOSDs`) so it never reaches them. The
    /// fsync must fail (ETIMEDOUT), not succeed, and the log must have a line naming the fsync, the image and
    /// the errno. Once the cluster is back, the same file takes a write and an fsync again, and that data is
    /// in RBD.
    @Test(arguments: [false, true])
    func aFlushThatTimesOutAfterAcceptedWritesFailsTheFsync(direct: Bool) throws {
        try #require(BlueStoreCluster.started)
        let image = uniqueName("flushtimeout")
        let work = try ReliabilityScratch(image)
        try BlueStoreCluster.sh("rbd create images/\(image) --size 8M")
        defer {
            _ = try? BlueStoreCluster.pauseOSDs(false)
            BlueStoreCluster.remove(image)
        }
        let mount = try self.mount(["--io-timeout", "3"])
        defer { mount.unmount() }
        let (status, lines) = try runFlushWriter(mount.path + "/images/" + image, in: work, direct: direct) {
            try BlueStoreCluster.pauseOSDs(true)
        }
        try BlueStoreCluster.pauseOSDs(false)
        #expect(status == "0", "writer: exit \(status): \(lines)")
        #expect(lines.first == "write ok", "the write was not accepted before the flush: \(lines)")
        #expect(lines.contains("fsync errno \(ETIMEDOUT)"), "fsync of writes that never reached the OSD: \(lines)")
        #expect(mount.logHasLine("fsync", "images/\(image)", "[errno \(ETIMEDOUT)]"), "no log line names the fsync, the image and the errno (\(mount.logFile))")
        // The cluster is back: the file is writable and durable again.
        try sh("head -c \(3 * Self.mib) /dev/urandom > \(work.q("again")) && dd if=\(work.q("again")) of=\(mount.q("images/\(image)")) bs=1M conv=notrunc,fsync status=none")
        #expect(try BlueStoreCluster.run("rbd export --no-progress images/\(image) - | cmp -n \(3 * Self.mib) - \(work.q("again"))").succeeded)
        #expect(mount.isMounted && mount.daemonIsRunning)
    }

    /// A `--sync` mount acknowledges no write before the OSDs have it: with `--io-timeout 3` and the OSDs
    /// paused, the write itself fails with ETIMEDOUT, where write-behind accepts it and fails the fsync.
    @Test func aSyncMountFailsTheWriteItselfWhenTheOsdsDoNotAnswer() throws {
        try #require(BlueStoreCluster.started)
        let image = uniqueName("syncwrite")
        let work = try ReliabilityScratch(image)
        try BlueStoreCluster.sh("rbd create images/\(image) --size 8M")
        defer {
            _ = try? BlueStoreCluster.pauseOSDs(false)
            BlueStoreCluster.remove(image)
        }
        let mount = try self.mount(["--io-timeout", "3", "--sync"])
        defer { mount.unmount() }
        let (status, lines) = try runFlushWriter(mount.path + "/images/" + image, in: work) {
            try BlueStoreCluster.pauseOSDs(true)
        }
        try BlueStoreCluster.pauseOSDs(false)
        #expect(status == "0", "writer: exit \(status): \(lines)")
        #expect(lines.first == "write errno \(ETIMEDOUT)", "a --sync mount accepted a write the OSDs never had: \(lines)")
        #expect(mount.isMounted && mount.daemonIsRunning)
    }

    /// Without any timeout: writes acknowledged (write-behind) while the OSDs are paused, then the client is
    /// fenced (`ceph osd blocklist add` of its address, what an operator or a client breaking its lock does)
    /// and the OSDs unpaused. The OSD refuses the held writes, so they are not in RBD: the fsync must fail and
    /// say so in the log, and the daemon must keep running.
    @Test func aFlushOfWritesRefusedToAFencedClientFailsTheFsync() throws {
        try #require(BlueStoreCluster.started)
        let image = uniqueName("flushfenced")
        let work = try ReliabilityScratch(image)
        try BlueStoreCluster.sh("rbd create images/\(image) --size 8M")
        var fenced: [String] = []
        defer {
            _ = try? BlueStoreCluster.pauseOSDs(false)
            for address in fenced { _ = try? BlueStoreCluster.sh("ceph osd blocklist rm \(address)") }
            BlueStoreCluster.remove(image)
        }
        let mount = try self.mount()
        defer { mount.unmount() }
        let (status, lines) = try runFlushWriter(mount.path + "/images/" + image, in: work, beforeWrite: {
            // The daemon holds the image open: it is its only watcher.
            let json = try BlueStoreCluster.sh("rbd status --format json images/\(image)")
            let watchers = (try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])?["watchers"] as? [[String: Any]] ?? []
            fenced = watchers.compactMap { $0["address"] as? String }
            try #require(fenced.count == 1, "watchers of the open image: \(json)")
            try BlueStoreCluster.pauseOSDs(true)
        }, afterWrite: {
            try BlueStoreCluster.sh("ceph osd blocklist add \(fenced[0]) 600")
            try BlueStoreCluster.pauseOSDs(false)
        })
        #expect(status == "0", "writer: exit \(status): \(lines)")
        #expect(lines.first == "write ok", "the write was not accepted before the flush: \(lines)")
        let fsync = lines.first { $0.hasPrefix("fsync ") } ?? "none"
        #expect(fsync.hasPrefix("fsync errno "), "fsync after the client was fenced: \(fsync), \(lines)")
        let errno = fsync.split(separator: " ").last.map(String.init) ?? "?"
        #expect(mount.logHasLine("fsync", "images/\(image)", "[errno \(errno)]"), "no log line names the fsync, the image and errno \(errno) (\(mount.logFile))")
        #expect(mount.isMounted && mount.daemonIsRunning)
        // The fsync told the truth: the 2 MiB are not in RBD. (Not none of them: a piece the daemon sent before
        // it had the osdmap with the pause can be; random data would leave about 2,088,960 non-zero bytes.)
        let kept = try BlueStoreCluster.sh("rbd export --no-progress images/\(image) - | tail -c +\(Self.mib + 513) | head -c \(2 * Self.mib) | tr -d '\\0' | wc -c")
        #expect((Int(kept.trimmed) ?? Int.max) < 2_000_000, "\(kept.trimmed) non-zero bytes where the refused 2 MiB went: all of it is in RBD")
    }
}
