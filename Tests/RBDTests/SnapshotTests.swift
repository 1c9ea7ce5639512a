import Foundation
import RBD
import Storage
import SystemPackage
import Testing

@Suite(skipWithoutCluster) struct SnapshotTests {
    /// Glance's upload, Nova's clone into another pool, Cinder's flatten: the whole life of a parent snapshot.
    @Test func snapshotProtectCloneChildrenFlatten() async throws {
        let parent = ImageSpec(pool: "images", name: uniqueName("parent"))
        let child = ImageSpec(pool: "vms", name: uniqueName("child"))
        try store.createImage(parent, size: 8 * MiB, options: ImageCreateOptions())
        defer { try? store.removeImage(parent) }
        let data = pattern(count: Int(MiB), seed: 7)
        let head = try store.openImage(parent, snapshot: nil, readOnly: false)
        defer { head.close() }
        try await head.write(at: 0, data)

        let before = Date()
        try head.createSnapshot("first")
        try head.renameSnapshot("first", to: "snap")
        var snapshots = try head.snapshots()
        #expect(snapshots.map(\.name) == ["snap"])
        #expect(snapshots.first?.isProtected == false)
        #expect(snapshots.first?.size == 8 * MiB)
        #expect(abs(Double(snapshots.first?.timestamp.seconds ?? 0) - before.timeIntervalSince1970) < 120)
        try head.protectSnapshot("snap")
        await expectStorageError(.resourceBusy) { try head.protectSnapshot("snap") }
        snapshots = try head.snapshots()
        #expect(snapshots.first?.isProtected == true)
        let described = try #require(
            try store.describeImages(pool: "images", namespace: "", names: [parent.name])[parent.name]?.get())
        #expect(described.snapshots == snapshots)

        // The snapshot reads as it was, whatever happens to the head, and is read-only.
        try await head.write(at: 0, [UInt8](repeating: 0, count: 4096))
        let frozen = try store.openImage(parent, snapshot: "snap", readOnly: false)
        defer { frozen.close() }
        #expect(frozen.isReadOnly && frozen.snapshot == "snap")
        #expect(try await frozen.read(at: 0, count: data.count) == data)
        await expectStorageError(.readOnlyFileSystem) { try await frozen.write(at: 0, [1]) }
        #expect(try frozen.usedBytes() == 4 * MiB)

        try store.cloneImage(parent: parent, snapshot: "snap", child: child, options: ImageCreateOptions())
        defer { try? store.removeImage(child) }
        #expect(try store.children(of: parent, snapshot: "snap") == [child])
        let clone = try store.openImage(child, snapshot: nil, readOnly: false)
        defer { clone.close() }
        #expect(try clone.info().parent == ParentInfo(image: parent, snapshot: "snap", overlap: 8 * MiB))
        #expect(try await clone.read(at: 0, count: data.count) == data)
        #expect(try clone.usedBytes() == 0, "a fresh clone holds nothing of its own")
        #expect(try clone.allocatedExtents(in: 0..<8 * MiB) == [0..<4 * MiB], "the parent's data shows through")
        await expectStorageError(.resourceBusy) { try head.unprotectSnapshot("snap") }
        await expectStorageError(.resourceBusy) { try head.removeSnapshot("snap") }

        let progress = Counter()
        try clone.flatten { done, total in
            #expect(done <= total)
            progress.increment()
        }
        #expect(progress.value > 0)
        #expect(try clone.info().parent == nil)
        #expect(try await clone.read(at: 0, count: data.count) == data)
        #expect(try clone.usedBytes() == 4 * MiB)
        #expect(try store.children(of: parent, snapshot: "snap") == [])

        try head.unprotectSnapshot("snap")
        await expectStorageError(.invalidArgument) { try head.unprotectSnapshot("snap") }
        try head.removeSnapshot("snap")
        #expect(try head.snapshots() == [])
    }

    @Test func cloneOfAnUnprotectedSnapshotIsRefused() async throws {
        let parent = ImageSpec(pool: "images", name: uniqueName("unprotected"))
        try store.createImage(parent, size: 4 * MiB, options: ImageCreateOptions())
        defer { try? store.removeImage(parent) }
        let head = try store.openImage(parent, snapshot: nil, readOnly: false)
        defer { head.close() }
        try head.createSnapshot("snap")
        defer { try? head.removeSnapshot("snap") }
        let error = #expect(throws: StorageError.self) {
            try store.cloneImage(parent: parent, snapshot: "snap", child: ImageSpec(pool: "vms", name: uniqueName("c")),
                                 options: ImageCreateOptions())
        }
        #expect(error?.operation == "rbd_clone3")
    }

    @Test func openingAMissingSnapshotIsENOENT() async throws {
        let spec = ImageSpec(pool: "images", name: uniqueName("no-snap"))
        try store.createImage(spec, size: 4 * MiB, options: ImageCreateOptions())
        defer { try? store.removeImage(spec) }
        let error = await expectStorageError(.noSuchFileOrDirectory) {
            _ = try store.openImage(spec, snapshot: "nope", readOnly: true)
        }
        #expect(error?.target == "\(spec)@nope")
    }

    @Test func listsManySnapshotsOldestFirst() throws {
        let spec = ImageSpec(pool: "images", name: uniqueName("many-snaps"))
        try store.createImage(spec, size: 4 * MiB, options: ImageCreateOptions())
        defer { try? store.removeImage(spec) }
        let head = try store.openImage(spec, snapshot: nil, readOnly: false)
        defer { head.close() }
        // More than the store first makes room for; each snapshot costs a monitor commit (about a second here).
        let names = (0..<6).map { "s\($0)" }
        for name in names { try head.createSnapshot(name) }
        defer { for name in names { try? head.removeSnapshot(name) } }

        let snapshots = try head.snapshots()
        #expect(snapshots.map(\.name) == names)
        #expect(snapshots.map(\.id) == snapshots.map(\.id).sorted())
    }
}
