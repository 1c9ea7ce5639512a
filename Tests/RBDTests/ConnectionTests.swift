import Foundation
import RBD
import Storage
import SystemPackage
import Testing

/// Connecting fails with an error, and in time, when the cluster cannot be reached: no cluster needed.
@Suite struct ConnectionFailureTests {
    @Test func unreachableMonitorFailsWithinTheTimeout() async throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent(uniqueName("conf"))
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let conf = folder.appendingPathComponent("ceph.conf")
        // Port 1 (tcpmux) has no listener; without cephx the client goes straight to hunting for a monitor.
        try """
            [global]
            mon host = v1:127.0.0.1:1
            auth cluster required = none
            auth service required = none
            auth client required = none
            log file = \(folder.path)/client.log

            """.write(to: conf, atomically: true, encoding: .utf8)

        let started = Date()
        let error = await expectStorageError(.timedOut) {
            _ = try CephStore.connect(conf: conf.path, id: nil, keyring: nil, timeout: 5, logger: testLogger)
        }
        let elapsed = Date().timeIntervalSince(started)
        #expect(error?.operation == "rados_connect")
        #expect(error?.target.contains("127.0.0.1:1") == true)
        #expect(elapsed >= 4 && elapsed < 15, "took \(elapsed) s")
    }

    @Test func missingConfFileIsENOENT() async {
        let error = await expectStorageError(.noSuchFileOrDirectory) {
            _ = try CephStore.connect(conf: "/nonexistent/ceph.conf", id: nil, keyring: nil, timeout: 5,
                                      logger: testLogger)
        }
        #expect(error?.operation == "rados_conf_read_file")
    }
}

@Suite(skipWithoutCluster) struct ClusterTests {
    @Test func listsTheOpenStackPoolsAsRBD() throws {
        let pools = try store.listPools()
        for name in ["images", "volumes", "vms"] {
            let pool = try #require(pools.first { $0.name == name }, "pools: \(pools)")
            #expect(pool.isRBD)
            #expect(pool.id > 0)
        }
    }

    @Test func connectsWithFractionalTimeouts() throws {
        // Ceph refuses "2.5" for its seconds options: the store rounds up.
        let other = try CephStore.connect(conf: cephConf, id: nil, keyring: nil, timeout: 0.5, osdOpTimeout: 2.5,
                                          options: ["rbd_cache": "false"], logger: testLogger)
        let (otherFSID, sharedFSID) = (try other.fsid(), try store.fsid())
        #expect(otherFSID == sharedFSID, "the second connection reports fsid \(otherFSID), the shared one \(sharedFSID)")
        other.shutdown()
        other.shutdown()
    }

    @Test func fsidIsTheConfiguredOne() throws {
        let fsid = try store.fsid()
        #expect(fsid.count == 36)
        let conf = try String(contentsOfFile: try #require(cephConf), encoding: .utf8)
        #expect(conf.contains(fsid))
    }

    @Test func createsAndDeletesAPoolForRBD() throws {
        let name = uniqueName("pool")
        try store.createPool(name)
        let pool = try #require(try store.listPools().first { $0.name == name })
        #expect(pool.isRBD)
        #expect(try store.listImages(pool: name, namespace: "") == [])
        try store.deletePool(name)
        #expect(try !store.listPools().contains { $0.name == name })
        #expect(throws: StorageError.self) { try store.listImages(pool: name, namespace: "") }
    }

    @Test func reportsUsage() throws {
        let cluster = try store.clusterStats()
        #expect(cluster.usedBytes <= cluster.totalBytes)
        let pool = try store.poolStats(pool: "images")
        #expect(pool.totalBytes == pool.usedBytes + pool.availableBytes)
        #expect(throws: StorageError.self) { try store.poolStats(pool: uniqueName("no-such-pool")) }
    }
}
