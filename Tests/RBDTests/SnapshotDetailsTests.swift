import Foundation
@testable import RBD
import Storage
import Testing

/// `describeSnapshots` reads snapshots' clones and object maps with librados instead of opening them: it
/// must report exactly what a handle open at each snapshot reports (`describeSnapshotsByOpening`).
@Suite(skipWithoutCluster) struct SnapshotDetailsTests {
    @Test func readsWhatOpeningTheSnapshotsReads() async throws {
        let cleanup = Cleanup()
        defer { cleanup.removeAll() }
        func image(_ purpose: String, namespace: String = "", size: UInt64 = 8 * MiB,
                   features: UInt64? = nil) throws -> ImageSpec {
            let spec = ImageSpec(pool: "images", namespace: namespace, name: uniqueName(purpose))
            try store.createImage(spec, size: size, options: ImageCreateOptions(objectSize: MiB, features: features))
            cleanup.add(spec)
            return spec
        }
        /// Writes (offset, count) pairs to the head, then takes snapshot `name` and protects it.
        func snapshot(_ spec: ImageSpec, _ name: String = "snap", after writes: [(UInt64, Int)] = []) async throws {
            let head = try store.openImage(spec, snapshot: nil, readOnly: false)
            defer { head.close() }
            for (index, write) in writes.enumerated() {
                try await head.write(at: write.0, pattern(count: write.1, seed: UInt8(index + 1)))
            }
            try await head.flush()
            try head.createSnapshot(name)
            try head.protectSnapshot(name)
        }
        func clone(_ parent: ImageSpec, into pool: String, namespace: String = "", format: Int) throws -> ImageSpec {
            let child = ImageSpec(pool: pool, namespace: namespace, name: uniqueName("clone-v\(format)"))
            try rbd("clone", "--rbd-default-clone-format", "\(format)", "\(parent)@snap", child.description)
            cleanup.add(child)
            return child
        }
        func moveToTrash(_ spec: ImageSpec) throws {
            let described = try store.describeImages(pool: spec.pool, namespace: spec.namespace, names: [spec.name])
            let id = try #require(try described[spec.name]?.get()).info.id
            try rbd("trash", "mv", spec.description)
            cleanup.add(trashedID: id, pool: spec.pool)
        }
        func namespace(in pool: String) throws -> String {
            let name = uniqueName("details")
            try store.createNamespace(pool: pool, name: name)
            cleanup.add(namespace: name, pool: pool)
            return name
        }

        // No clones; objects 0 and 3 hold data at the snapshot, and the head is written further afterwards.
        let alone = try image("alone")
        try await snapshot(alone, after: [(0, 4096), (3 * MiB + 100, 100)])
        let aloneHead = try store.openImage(alone, snapshot: nil, readOnly: false)
        try await aloneHead.write(at: 5 * MiB, pattern(count: 4096, seed: 9))
        try await aloneHead.flush()
        aloneHead.close()

        // Clone v2 children in four places: this pool, two others, and a namespace of one of them.
        let volumesNamespace = try namespace(in: "volumes")
        let withV2 = try image("v2")
        try await snapshot(withV2, after: [(MiB, 4096)])
        let v2Children = [
            try clone(withV2, into: "vms", format: 2), try clone(withV2, into: "volumes", format: 2),
            try clone(withV2, into: "volumes", namespace: volumesNamespace, format: 2),
            try clone(withV2, into: "images", format: 2),
        ]

        // A clone v1 child, and a clone v2 beside it in the same pool.
        let withV1 = try image("v1")
        try await snapshot(withV1)
        let v1Children = [try clone(withV1, into: "vms", format: 1), try clone(withV1, into: "vms", format: 2)]

        // Whose only clone is in the trash: not counted, whether v2 or v1.
        let trashedV2 = try image("trashed-v2")
        try await snapshot(trashedV2)
        try moveToTrash(try clone(trashedV2, into: "vms", format: 2))
        let trashedV1 = try image("trashed-v1")
        try await snapshot(trashedV1)
        try moveToTrash(try clone(trashedV1, into: "vms", format: 1))

        // Without an object map only librbd's slow diff knows the used bytes: opened.
        let withoutObjectMap = try image("no-object-map", features: 1)
        try await snapshot(withoutObjectMap, after: [(0, 4096)])

        // An empty snapshot, and an image with two snapshots of different sizes, one of them cloned.
        let empty = try image("empty", size: 0)
        try await snapshot(empty)
        let twoSnapshots = try image("two-snapshots")
        try await snapshot(twoSnapshots, "first", after: [(0, 4096)])
        let twoHead = try store.openImage(twoSnapshots, snapshot: nil, readOnly: false)
        try twoHead.resize(to: 12 * MiB)
        try await twoHead.write(at: 10 * MiB, pattern(count: 4096, seed: 7))
        try await twoHead.flush()
        twoHead.close()
        try await snapshot(twoSnapshots, "second")
        let firstClone = ImageSpec(pool: "vms", name: uniqueName("clone-first"))
        try rbd("clone", "--rbd-default-clone-format", "2", "\(twoSnapshots)@first", firstClone.description)
        cleanup.add(firstClone)

        // A namespace's image, cloned (v2) into the default namespace of another pool.
        let imagesNamespace = try namespace(in: "images")
        let inNamespace = try image("in-ns", namespace: imagesNamespace)
        try await snapshot(inNamespace, after: [(2 * MiB, 4096)])
        let namespaceChild = try clone(inNamespace, into: "vms", format: 2)

        var references: [SnapshotReference] = []
        for (namespace, images) in [("", [alone, withV2, withV1, trashedV2, trashedV1, withoutObjectMap, empty,
                                          twoSnapshots]), (imagesNamespace, [inNamespace])] {
            let summaries = try store.describeImages(pool: "images", namespace: namespace, names: images.map(\.name))
            for spec in images {
                let summary = try #require(try summaries[spec.name]?.get())
                references += summary.snapshots.map {
                    SnapshotReference(image: spec, imageID: summary.info.id, snapshot: $0)
                }
            }
        }
        #expect(references.count == 10)
        func reference(_ spec: ImageSpec, _ name: String = "snap") throws -> SnapshotReference {
            try #require(references.first { $0.image == spec && $0.snapshot.name == name })
        }

        // Every snapshot but the one without an object map is read without opening it.
        let direct = try store.describeSnapshotsWithoutOpening(references)
        #expect(direct.toOpen == [try reference(withoutObjectMap)], "\(direct.toOpen.map(\.description))")
        #expect(Set(direct.details.keys) == Set(references).subtracting([try reference(withoutObjectMap)]))

        // And what is read equals what librbd reports.
        let described = try store.describeSnapshots(references)
        let opened = try store.describeSnapshotsByOpening(references)
        #expect(described.count == references.count && opened.count == references.count)
        for reference in references {
            #expect(described[reference] == opened[reference], "\(reference)")
        }

        // A few facts, so that the comparison is not between two equally wrong answers.
        func details(_ spec: ImageSpec, _ name: String = "snap") throws -> SnapshotDetails {
            try #require(try described[try reference(spec, name)]?.get())
        }
        #expect(try details(alone) == SnapshotDetails(children: [], usedBytes: 2 * MiB))
        #expect(try details(withV2).children == [v2Children[3], v2Children[0], v2Children[1], v2Children[2]])
        #expect(try details(withV2).usedBytes == MiB)
        #expect(try details(withV1).children == v1Children.sorted { $0.name < $1.name })
        #expect(try details(trashedV2).children == [])
        #expect(try details(trashedV1).children == [])
        #expect(try details(withoutObjectMap).usedBytes == MiB)
        #expect(try details(empty) == SnapshotDetails(children: [], usedBytes: 0))
        #expect(try details(twoSnapshots, "first") == SnapshotDetails(children: [firstClone], usedBytes: MiB))
        #expect(try details(twoSnapshots, "second") == SnapshotDetails(children: [], usedBytes: 2 * MiB))
        #expect(try details(inNamespace) == SnapshotDetails(children: [namespaceChild], usedBytes: MiB))
    }

    @Test func aSnapshotRemovedSinceItWasListedFailsAsOpeningIt() async throws {
        let cleanup = Cleanup()
        defer { cleanup.removeAll() }
        let spec = ImageSpec(pool: "images", name: uniqueName("removed-snap"))
        try store.createImage(spec, size: 4 * MiB, options: ImageCreateOptions())
        cleanup.add(spec)
        let head = try store.openImage(spec, snapshot: nil, readOnly: false)
        defer { head.close() }
        try head.createSnapshot("gone")
        let summary = try #require(try store.describeImages(pool: "images", namespace: "", names: [spec.name])[spec.name]?.get())
        let reference = SnapshotReference(image: spec, imageID: summary.info.id, snapshot: summary.snapshots[0])
        try head.removeSnapshot("gone")

        #expect(try store.describeSnapshotsWithoutOpening([reference]).toOpen == [reference])
        let described = try store.describeSnapshots([reference])
        #expect(throws: StorageError(.noSuchFileOrDirectory, operation: "rbd_open_read_only",
                                     target: "images/\(spec.name)@gone")) { try described[reference]?.get() }
    }

    @Test func namesSnapshotObjectMapsAsLibrbdDoes() {
        #expect(RBDClass.objectMapObject(id: "10ab2c3d4e5f", snapshotID: 0x1c) == "rbd_object_map.10ab2c3d4e5f.000000000000001c")
        #expect(RBDClass.objectMapObject(id: "abc", snapshotID: UInt64.max - 1) == "rbd_object_map.abc.fffffffffffffffe")
    }
}
