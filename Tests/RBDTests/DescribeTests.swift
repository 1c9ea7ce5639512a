import Foundation
@testable import RBD
import Storage
import SystemPackage
import Testing

/// `describeImages` reads image metadata objects instead of opening images: it must report exactly what
/// librbd reports from an open image (`describeImagesByOpening`), field by field.
@Suite(skipWithoutCluster) struct DescribeTests {
    @Test func readsWhatOpeningTheImagesReads() async throws {
        let images = Cleanup()
        defer { images.removeAll() }
        func image(_ purpose: String, pool: String = "images", namespace: String = "", size: UInt64,
                   options: ImageCreateOptions = ImageCreateOptions()) throws -> ImageSpec {
            let spec = ImageSpec(pool: pool, namespace: namespace, name: uniqueName(purpose))
            try store.createImage(spec, size: size, options: options)
            images.add(spec)
            return spec
        }
        func withHead(_ spec: ImageSpec, _ body: (any ImageHandle) async throws -> Void) async throws {
            let head = try store.openImage(spec, snapshot: nil, readOnly: false)
            defer { head.close() }
            try await body(head)
            try await head.flush()
        }

        let plain = try image("plain", size: GiB)
        let empty = try image("empty", size: 0)
        let emptyWithoutObjectMap = try image("empty-no-map", size: 0, options: ImageCreateOptions(features: 1))

        // Objects 0 and 3 whole, and the 512 bytes of object 10 inside the image.
        let written = try image("written", size: 10 * MiB + 512, options: ImageCreateOptions(objectSize: MiB))
        try await withHead(written) { head in
            try await head.write(at: 0, pattern(count: 4096, seed: 1))
            try await head.write(at: 3 * MiB + 100, pattern(count: 100, seed: 2))
            try await head.write(at: 10 * MiB, pattern(count: 512, seed: 3))
        }

        // Snapshots of several sizes, one protected, objects clean and dirty since, the head shrunk below them.
        let snapshotted = try image("snapshots", size: 8 * MiB)
        try await withHead(snapshotted) { head in
            try await head.write(at: 0, pattern(count: 4096, seed: 4))
            try head.createSnapshot("one")
            try head.protectSnapshot("one")
            try await head.write(at: 5 * MiB, pattern(count: 4096, seed: 5))
            try head.createSnapshot("two")
            try await head.write(at: 0, pattern(count: 4096, seed: 6))
            try head.resize(to: 12 * MiB)
            try await head.write(at: 9 * MiB, pattern(count: 4096, seed: 7))
            try head.createSnapshot("three")
            try head.resize(to: 6 * MiB)
        }

        let grown = try image("resized", size: 4 * MiB)
        try await withHead(grown) { head in
            try await head.write(at: MiB, pattern(count: 4096, seed: 8))
            try head.resize(to: 20 * MiB + 4096)
            try await head.write(at: 20 * MiB, pattern(count: 4096, seed: 9))
        }

        // Clones of the protected snapshot: one in the same pool (with data of its own), one in another.
        let clone = ImageSpec(pool: "images", name: uniqueName("clone"))
        try store.cloneImage(parent: snapshotted, snapshot: "one", child: clone, options: ImageCreateOptions())
        images.add(clone)
        try await withHead(clone) { head in try await head.write(at: 2 * MiB, pattern(count: 4096, seed: 10)) }
        let otherPoolClone = ImageSpec(pool: "vms", name: uniqueName("clone-vms"))
        try store.cloneImage(parent: snapshotted, snapshot: "one", child: otherPoolClone,
                             options: ImageCreateOptions())
        images.add(otherPoolClone)

        // Data objects in another pool (what erasure-coded pools need); the store cannot make one, rbd can.
        let dataPool = ImageSpec(pool: "images", name: uniqueName("data-pool"))
        try rbd("create", "--size", "8M", "--data-pool", "volumes", dataPool.description)
        images.add(dataPool)
        try await withHead(dataPool) { head in try await head.write(at: 4 * MiB, pattern(count: 4096, seed: 13)) }

        // Without an object map only librbd's slow diff knows the used bytes: opened.
        let withoutObjectMap = try image("no-object-map", size: 8 * MiB, options: ImageCreateOptions(features: 1))
        try await withHead(withoutObjectMap) { head in try await head.write(at: 0, pattern(count: 4096, seed: 11)) }

        // A namespace, and a clone (v2) out of it whose parent snapshot then goes to the trash.
        let namespace = uniqueName("describe")
        try store.createNamespace(pool: "images", name: namespace)
        images.add(namespace: namespace, pool: "images")
        let inNamespace = try image("in-ns", namespace: namespace, size: 4 * MiB)
        try await withHead(inNamespace) { head in
            try await head.write(at: 0, pattern(count: 4096, seed: 12))
            try head.createSnapshot("kept")
            try head.createSnapshot("trashed")
        }
        let namespaceClone = ImageSpec(pool: "images", name: uniqueName("clone-of-ns"))
        try store.cloneImage(parent: inNamespace, snapshot: "trashed", child: namespaceClone,
                             options: ImageCreateOptions())
        images.add(namespaceClone)
        try await withHead(inNamespace) { head in try head.removeSnapshot("trashed") }

        let missing = uniqueName("missing")
        let defaultNames = [plain, empty, emptyWithoutObjectMap, written, snapshotted, grown, clone, dataPool,
                            withoutObjectMap, namespaceClone].map(\.name) + [missing]
        let groups: [(pool: String, namespace: String, names: [String])] = [
            ("images", "", defaultNames), ("vms", "", [otherPoolClone.name]),
            ("images", namespace, [inNamespace.name]),
        ]

        // Every image but two is read without opening it.
        let direct = try store.describeImagesWithoutOpening(pool: "images", namespace: "", names: defaultNames)
        #expect(Set(direct.toOpen) == [withoutObjectMap.name, missing])
        #expect(Set(direct.summaries.keys) == Set(defaultNames).subtracting([withoutObjectMap.name, missing]))
        for group in groups.dropFirst() {
            let read = try store.describeImagesWithoutOpening(
                pool: group.pool, namespace: group.namespace, names: group.names)
            #expect(read.toOpen == [] && Set(read.summaries.keys) == Set(group.names))
        }

        // And what is read equals what librbd reports, errors included.
        for group in groups {
            let described = try store.describeImages(pool: group.pool, namespace: group.namespace, names: group.names)
            let opened = try store.describeImagesByOpening(
                pool: group.pool, namespace: group.namespace, names: group.names)
            #expect(described.count == group.names.count && opened.count == group.names.count)
            for name in group.names {
                #expect(described[name] == opened[name], "\(group.pool)/\(group.namespace)/\(name)")
            }
        }

        // A few facts, so that the comparison is not between two equally wrong answers.
        let summaries = try store.describeImages(pool: "images", namespace: "", names: defaultNames)
        #expect(try summaries[written.name]?.get().usedBytes == 2 * MiB + 512)
        #expect(try summaries[plain.name]?.get().usedBytes == 0)
        #expect(try summaries[empty.name]?.get().info.size == 0)
        let snapshots = try #require(try summaries[snapshotted.name]?.get())
        #expect(snapshots.info.size == 6 * MiB)
        #expect(snapshots.snapshots.map(\.name) == ["one", "two", "three"])
        #expect(snapshots.snapshots.map(\.size) == [8 * MiB, 8 * MiB, 12 * MiB])
        #expect(snapshots.snapshots.map(\.isProtected) == [true, false, false])
        #expect(snapshots.usedBytes == 6 * MiB, "object 0, and object 1 up to the end: the shrink dropped object 2")
        #expect(try summaries[grown.name]?.get().usedBytes == 4 * MiB + 4096)
        let cloneInfo = try #require(try summaries[clone.name]?.get())
        #expect(cloneInfo.info.parent == ParentInfo(image: snapshotted, snapshot: "one", overlap: 8 * MiB))
        #expect(cloneInfo.usedBytes == 4 * MiB)
        #expect(try summaries[namespaceClone.name]?.get().info.parent?.image == inNamespace)
        #expect(try summaries[withoutObjectMap.name]?.get().usedBytes == 4 * MiB)
        let dataPoolInfo = try #require(try summaries[dataPool.name]?.get())
        #expect(dataPoolInfo.usedBytes == 4 * MiB && dataPoolInfo.info.features & 1 << 7 != 0)
        #expect(throws: StorageError(.noSuchFileOrDirectory, operation: "rbd_aio_open_read_only",
                                     target: "images/\(missing)")) { try summaries[missing]?.get() }
        let namespaced = try store.describeImages(pool: "images", namespace: namespace, names: [inNamespace.name])
        #expect(try namespaced[inNamespace.name]?.get().snapshots.map(\.name) == ["kept"])
    }

    @Test func describesNoImagesWhenThePoolIsMissing() throws {
        let pool = uniqueName("no-pool")
        let names = ["a", "b"]
        let described = try store.describeImages(pool: pool, namespace: "", names: names)
        #expect(described.count == 2)
        #expect(throws: StorageError.self) { try described["a"]?.get() }
        #expect(try described["a"] == store.describeImagesByOpening(pool: pool, namespace: "", names: names)["a"])
    }

    @Test func decodesCephEncodingWithBoundsChecks() throws {
        var encoder = CephEncoder()
        encoder.u64(0x0102_0304_0506_0708)
        encoder.string("héllo")
        encoder.bool(true)
        var decoder = CephDecoder(encoder.bytes)
        #expect(try decoder.u64() == 0x0102_0304_0506_0708)
        #expect(try decoder.string() == "héllo")
        #expect(try decoder.bool())
        #expect(decoder.isAtEnd)
        #expect(throws: CephDecodingError.self) { try decoder.u8() }

        // A length larger than what follows, an array count larger than the bytes left, a bool that is 2.
        var short = CephDecoder([5, 0, 0, 0, 0x61])
        #expect(throws: CephDecodingError.self) { try short.string() }
        var huge = CephDecoder([0xff, 0xff, 0xff, 0xff, 1])
        #expect(throws: CephDecodingError.self) { try huge.array("ids") { try $0.u64() } }
        var notBool = CephDecoder([2])
        #expect(throws: CephDecodingError.self) { try notBool.bool() }

        // A versioned structure: newer fields skipped, a newer compat refused, a length past the end refused.
        var newer = CephDecoder([3, 1, 9, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0xee, 42])
        let (version, value) = try newer.structure("s", known: 1) { fields, version in (version, try fields.u64()) }
        #expect(version == 3 && value == 7)
        #expect(try newer.u8() == 42)
        var incompatible = CephDecoder([2, 2, 0, 0, 0, 0])
        #expect(throws: CephDecodingError.self) { try incompatible.structure("s", known: 1) { _, _ in () } }
        var truncated = CephDecoder([1, 1, 8, 0, 0, 0, 1, 2])
        #expect(throws: CephDecodingError.self) { try truncated.structure("s", known: 1) { _, _ in () } }
        // Reading past a structure's own length fails even if the buffer goes on.
        var bounded = CephDecoder([1, 1, 1, 0, 0, 0, 5, 6, 7, 8, 9])
        #expect(throws: CephDecodingError.self) { try bounded.structure("s", known: 1) { f, _ in try f.u32() } }
    }

    @Test func countsTheObjectsAnObjectMapSaysExist() throws {
        // 6 entries: exists, nonexistent, clean, nonexistent | nonexistent, exists.
        let entries: [UInt8] = [0b01_00_11_00, 0b00_01_00_00]
        let map = try RBDClass.ObjectMap(decoding: objectMap(entryCount: 6, entries: entries))
        #expect(map.entryCount == 6)
        #expect(map.usedBytes(size: 6 * MiB, objectSize: MiB) == 3 * MiB)
        // The last object counts up to the image's end only.
        #expect(map.usedBytes(size: 5 * MiB + 10, objectSize: MiB) == 2 * MiB + 10)
        #expect(map.usedBytes(size: 0, objectSize: MiB) == 0)
        // A map smaller than the image, or a pending object, is left to librbd.
        #expect(map.usedBytes(size: 7 * MiB, objectSize: MiB) == nil)
        let pending = try RBDClass.ObjectMap(decoding: objectMap(entryCount: 2, entries: [0b01_10_00_00]))
        #expect(pending.usedBytes(size: 2 * MiB, objectSize: MiB) == nil)
        #expect(pending.usedBytes(size: MiB, objectSize: MiB) == MiB)
        // Fewer entry bytes than the count needs.
        #expect(throws: CephDecodingError.self) {
            try RBDClass.ObjectMap(decoding: objectMap(entryCount: 9, entries: entries))
        }
    }

    /// A `BitVector<2>` as `object_map_load` encodes it (no checksums).
    private func objectMap(entryCount: UInt64, entries: [UInt8]) -> [UInt8] {
        var header: [UInt8] = [1, 1, 8, 0, 0, 0]
        withUnsafeBytes(of: entryCount.littleEndian) { header.append(contentsOf: $0) }
        return [UInt8(header.count), 0, 0, 0] + header + entries + [0, 0, 0, 0]
    }
}
