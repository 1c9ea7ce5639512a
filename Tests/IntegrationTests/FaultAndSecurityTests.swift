import Foundation
import Testing

/// A cluster of its own, with cephx, for the tests that pause the OSDs or restrict a client: they must not
/// stall or weaken the shared test cluster. Started on first use, stopped when the test process exits.
enum PrivateCluster {
    static let directory = "/tmp/rbdfs-private-\(getpid())"
    static var conf: String { directory + "/ceph.conf" }

    /// Starts it once; nil (with the reason printed) if it cannot start.
    static let started: Bool = {
        let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().path
        let result = try? run("RBDFS_CLUSTER_MGR=0 \(repo)/scripts/cluster start --dir \(directory) --cephx", timeout: 180)
        guard let result, result.succeeded else {
            print("private cephx cluster did not start: \(result?.stderr ?? "scripts/cluster not runnable")")
            return false
        }
        stopAtExitPath = strdup(repo + "/scripts/cluster stop --dir " + directory)
        atexit {
            if let command = PrivateCluster.stopAtExitPath { system(command) }
        }
        return true
    }()

    nonisolated(unsafe) static var stopAtExitPath: UnsafeMutablePointer<CChar>?

    /// A command against the private cluster, as client.admin.
    @discardableResult
    static func sh(_ command: String, timeout: Double = 120) throws -> String {
        try IntegrationTests.sh("export CEPH_CONF=\(conf); \(command)", timeout: timeout)
    }
}

@Suite(.serialized, .enabled(if: Environment.isReady, Environment.skipReason))
struct FaultAndSecurityTests {
    /// mount with the given arguments on the private cluster.
    func mount(_ arguments: [String]) throws -> MountedRBDFS {
        try MountedRBDFS(["--conf", PrivateCluster.conf] + arguments)
    }

    @Test func aRestrictedCephxClientSeesItsPoolAndIsRefusedElsewhere() throws {
        try #require(PrivateCluster.started)
        let image = uniqueName("cephx")
        let keyring = PrivateCluster.directory + "/client.glance-\(image).keyring"
        try PrivateCluster.sh("""
            rbd create images/\(image) --size 4M && rbd create vms/\(image) --size 4M && \
            ceph auth get-or-create client.glance-\(image) mon 'profile rbd' osd 'profile rbd pool=images' -o \(keyring)
            """)
        defer { _ = try? PrivateCluster.sh("rbd rm images/\(image); rbd rm vms/\(image); ceph auth del client.glance-\(image)") }
        let mount = try self.mount(["--id", "glance-\(image)", "--keyring", keyring])
        try sh("head -c 4096 /dev/urandom > \(mount.path).data && dd if=\(mount.path).data of=\(mount.q("images/\(image)")) conv=notrunc,fsync status=none")
        try PrivateCluster.sh("rbd export --no-progress images/\(image) - | cmp -n 4096 - \(mount.path).data")
        let elsewhere = try run("ls -l \(mount.q("vms"))")
        #expect(!elsewhere.succeeded)
        #expect(elsewhere.stderr.contains("Permission denied"), "\(elsewhere.stderr)")
        // The daemon is still serving after the refusal.
        #expect(try sh("stat -c %s \(mount.q("images/\(image)"))").trimmed == "\(4 << 20)")
        try? FileManager.default.removeItem(atPath: mount.path + ".data")
    }

    @Test func aWrongOrMissingKeyIsRefusedAtMountWithAMessage() throws {
        try #require(PrivateCluster.started)
        let dir = NSTemporaryDirectory() + uniqueName("badkey")
        try sh("""
            mkdir -p \(dir)/mnt && printf '[client.nobody]\\n\\tkey = AQBvaW5vdGFyZWFsa2V5MDAwMDAwMDAwMDAwMDA9PQ==\\n' > \(dir)/bad.keyring
            """)
        defer { _ = try? run("rm -rf \(dir)") }
        let started = Date()
        let wrong = try run("\(shellQuote(Environment.binary!)) mount \(dir)/mnt --conf \(PrivateCluster.conf) --id nobody --keyring \(dir)/bad.keyring --connect-timeout 10", timeout: 60)
        #expect(!wrong.succeeded)
        #expect(Date().timeIntervalSince(started) < 30)
        #expect(wrong.stderr.contains("rados_connect"), "\(wrong.stderr)")
        let missing = try run("\(shellQuote(Environment.binary!)) mount \(dir)/mnt --conf \(PrivateCluster.conf) --id nobody --keyring \(dir)/absent.keyring --connect-timeout 10", timeout: 60)
        #expect(!missing.succeeded && !missing.stderr.isEmpty, "\(missing.stderr)")
        #expect(!((try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? "").contains("\(dir)/mnt"))
    }

    @Test func ioWaitsThroughAnOsdPauseAndCompletesCorrectly() throws {
        try #require(PrivateCluster.started)
        let image = uniqueName("pause")
        try PrivateCluster.sh("rbd create images/\(image) --size 16M")
        defer { _ = try? PrivateCluster.sh("ceph osd unpause; rbd rm images/\(image)") }
        let mount = try self.mount([])
        try sh("head -c 8388608 /dev/urandom > \(mount.path).data")
        defer { try? FileManager.default.removeItem(atPath: mount.path + ".data") }
        try PrivateCluster.sh("ceph osd pause")
        // The write waits while the OSD is paused...
        let writer = "dd if=\(mount.path).data of=\(mount.q("images/\(image)")) bs=1M conv=notrunc,fsync status=none; echo done > \(mount.path).done"
        try sh("(\(writer)) >/dev/null 2>&1 &")
        sleep(3)
        #expect(!FileManager.default.fileExists(atPath: mount.path + ".done"), "the write finished while the OSD was paused")
        try PrivateCluster.sh("ceph osd unpause")
        // ...and completes once it is back, with every byte in place.
        #expect(eventually(within: 60) { FileManager.default.fileExists(atPath: mount.path + ".done") })
        try? FileManager.default.removeItem(atPath: mount.path + ".done")
        try PrivateCluster.sh("rbd export --no-progress images/\(image) - | cmp -n 8388608 - \(mount.path).data")
    }

    @Test func withAnIoTimeoutAPausedClusterGivesAnErrorNotAHangAndTheMountRecovers() throws {
        try #require(PrivateCluster.started)
        let image = uniqueName("iotimeout")
        try PrivateCluster.sh("rbd create images/\(image) --size 8M && rbd bench --io-type write --io-size 1M --io-total 8M images/\(image) >/dev/null")
        defer { _ = try? PrivateCluster.sh("ceph osd unpause; rbd rm images/\(image)") }
        let mount = try self.mount(["--io-timeout", "3"])
        try sh("stat \(mount.q("images/\(image)")) >/dev/null")
        try PrivateCluster.sh("ceph osd pause")
        let started = Date()
        let read = try run("dd if=\(mount.q("images/\(image)")) of=/dev/null bs=1M count=1 iflag=direct", timeout: 60)
        let elapsed = Date().timeIntervalSince(started)
        try PrivateCluster.sh("ceph osd unpause")
        #expect(!read.succeeded)
        #expect(read.stderr.contains("timed out") || read.stderr.contains("Input/output error"), "\(read.stderr)")
        #expect(elapsed < 30, "the read took \(elapsed) s")
        // The daemon recovers when the cluster is back.
        #expect(try eventually(within: 30) {
            (try run("dd if=\(mount.q("images/\(image)")) of=/dev/null bs=1M count=1 iflag=direct")).succeeded
        })
        #expect(mount.isMounted)
    }
}
