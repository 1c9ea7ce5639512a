import Foundation
import RBD
import Storage
import SystemPackage
import Testing

@Suite(skipWithoutCluster) struct NamespaceTests {
    @Test func createsAndRemovesANamespace() async throws {
        let namespace = uniqueName("empty")
        try store.createNamespace(pool: "vms", name: namespace)
        #expect(try store.listNamespaces(pool: "vms").contains(namespace))
        await expectStorageError(.fileExists) { try store.createNamespace(pool: "vms", name: namespace) }
        try store.removeNamespace(pool: "vms", name: namespace)
        #expect(try !store.listNamespaces(pool: "vms").contains(namespace))
    }

    @Test func imagesLiveInTheirNamespace() async throws {
        let namespace = uniqueName("ns")
        try store.createNamespace(pool: "volumes", name: namespace)
        defer { try? store.removeNamespace(pool: "volumes", name: namespace) }
        #expect(try store.listNamespaces(pool: "volumes").contains(namespace))
        #expect(try store.listImages(pool: "volumes", namespace: namespace) == [])

        let spec = ImageSpec(pool: "volumes", namespace: namespace, name: uniqueName("inside"))
        try store.createImage(spec, size: 4 * MiB, options: ImageCreateOptions())
        defer { try? store.removeImage(spec) }
        #expect(try store.listImages(pool: "volumes", namespace: namespace) == [spec.name])
        #expect(try !store.listImages(pool: "volumes", namespace: "").contains(spec.name))
        #expect(try store.describeImages(pool: "volumes", namespace: namespace, names: [spec.name])[spec.name]?
            .get().info.size == 4 * MiB)

        // A clone may live in another pool and namespace (librbd's clone v1 refuses that with EXDEV).
        let head = try store.openImage(spec, snapshot: nil, readOnly: false)
        defer { head.close() }
        try head.createSnapshot("snap")
        defer { try? head.removeSnapshot("snap") }
        try head.protectSnapshot("snap")
        defer { try? head.unprotectSnapshot("snap") }
        let child = ImageSpec(pool: "images", name: uniqueName("from-ns"))
        try store.cloneImage(parent: spec, snapshot: "snap", child: child, options: ImageCreateOptions())
        defer { try? store.removeImage(child) }
        #expect(try store.children(of: spec, snapshot: "snap") == [child])
        let clone = try store.openImage(child, snapshot: nil, readOnly: true)
        defer { clone.close() }
        #expect(try clone.info().parent?.image == spec)

        await expectStorageError(.resourceBusy) { try store.removeNamespace(pool: "volumes", name: namespace) }
    }

    /// Removing a snapshot that a clone v2 child still uses moves it to librbd's trash namespace: it must
    /// not be listed as a user snapshot (nor its child as a child of anything listable).
    @Test func aSnapshotInTheTrashIsNotListed() async throws {
        let namespace = uniqueName("trash")
        try store.createNamespace(pool: "images", name: namespace)
        defer { try? store.removeNamespace(pool: "images", name: namespace) }
        let parent = ImageSpec(pool: "images", namespace: namespace, name: uniqueName("parent"))
        try store.createImage(parent, size: 4 * MiB, options: ImageCreateOptions())
        defer { try? store.removeImage(parent) }
        let head = try store.openImage(parent, snapshot: nil, readOnly: false)
        defer { head.close() }
        try head.createSnapshot("snap")
        // Across namespaces the store asks for clone v2, which needs no protection.
        let child = ImageSpec(pool: "images", name: uniqueName("child-v2"))
        try store.cloneImage(parent: parent, snapshot: "snap", child: child, options: ImageCreateOptions())
        defer { try? store.removeImage(child) }

        try head.removeSnapshot("snap")
        #expect(try head.snapshots() == [])
        #expect(try store.describeImages(pool: "images", namespace: namespace, names: [parent.name])[parent.name]?
            .get().snapshots == [])
        let clone = try store.openImage(child, snapshot: nil, readOnly: true)
        defer { clone.close() }
        #expect(try clone.info().parent?.image == parent)
    }
}
