import Foundation
import Logging
import MemoryStore
import RBDFS
import Storage
import Testing

/// The OpenStack conventions driven on the in-memory store: create, upload, snapshot and clone by link,
/// remove, rename, directories and attributes.
@Suite struct LifecycleTests {
    let mib: UInt64 = 1 << 20

    func pool(_ h: Harness, _ name: String = "images") throws -> UInt64 { try h.path(name) }

    @Test func createWritesAndEndsAtExactlyTheBytesWritten() throws {
        let h = try Harness()
        let (entry, file) = try h.fs.create(parent: try pool(h), name: "new", flags: O_WRONLY | O_CREAT)
        let data = [UInt8](repeating: 9, count: Int(5 * mib) + 123)
        #expect(try h.write(file, at: 0, data) == data.count)
        try h.fsync(file)
        h.fs.release(file)
        let image = try h.store.openImage(ImageSpec(pool: "images", name: "new"), snapshot: nil, readOnly: true)
        #expect(try image.size() == UInt64(data.count))
        #expect(try h.fs.getattr(entry.inode).size == UInt64(data.count))
    }

    @Test func glanceUploadTakesAndProtectsTheSnapshotAtTheLastClose() throws {
        let h = try Harness()
        let (entry, file) = try h.fs.create(parent: try pool(h), name: "abc@snap", flags: O_WRONLY | O_CREAT)
        _ = try h.write(file, at: 0, [1, 2, 3, 4])
        // While uploading, the file is writable and shows what was written.
        #expect(try h.fs.getattr(entry.inode).size == 4)
        let closed = Outcome<Void>()
        h.fs.flush(file) { closed.set($0) }
        try closed.wait()
        h.fs.release(file)
        let snaps = try h.store.openImage(ImageSpec(pool: "images", name: "abc"), snapshot: nil, readOnly: true).snapshots()
        #expect(snaps.map(\.name) == ["snap"])
        #expect(snaps.first?.isProtected == true)
        #expect(try h.fs.getattr(entry.inode).permissions == 0o444)
        // Uploading again onto the same image name is EEXIST.
        expectErrno(.fileExists) { _ = try h.fs.create(parent: try pool(h), name: "abc@other", flags: O_WRONLY | O_CREAT) }
    }

    @Test func aFailedWriteCancelsTheUploadSnapshot() throws {
        let h = try Harness()
        let (_, file) = try h.fs.create(parent: try pool(h), name: "broken@snap", flags: O_WRONLY | O_CREAT)
        h.store.injectFault(.ioError, operation: "rbd_aio_write")
        expectErrno(.ioError) { _ = try h.write(file, at: 0, [1, 2, 3]) }
        let closed = Outcome<Void>()
        h.fs.flush(file) { closed.set($0) }
        expectErrno(.ioError) { try closed.wait() }
        h.fs.release(file)
        let snaps = try h.store.openImage(ImageSpec(pool: "images", name: "broken"), snapshot: nil, readOnly: true).snapshots()
        #expect(snaps.isEmpty)
    }

    @Test func linkSnapshotsClonesAndVolumeClones() throws {
        let h = try Harness { store in
            try store.createImage(ImageSpec(pool: "images", name: "base"), size: 4 * mib, options: .init())
        }
        let base = try h.path("images", "base")
        _ = try h.fs.link(base, newParent: try pool(h), newName: "base@snap")
        let snap = try h.path("images", "base@snap")
        #expect(try h.fs.getattr(snap).linkCount == 1)
        _ = try h.fs.link(snap, newParent: try pool(h, "vms"), newName: "vm_disk")
        let child = try h.store.openImage(ImageSpec(pool: "vms", name: "vm_disk"), snapshot: nil, readOnly: true).info()
        #expect(child.parent?.image == ImageSpec(pool: "images", name: "base"))
        #expect(child.parent?.snapshot == "snap")
        // Volume clone: a snapshot named after the new volume, then a clone of it.
        _ = try h.fs.link(base, newParent: try pool(h, "volumes"), newName: "vol")
        let volume = try h.store.openImage(ImageSpec(pool: "volumes", name: "vol"), snapshot: nil, readOnly: true).info()
        #expect(volume.parent?.snapshot == "vol.clone_snap")
        // The snapshot's link count shows its clones (after the listing cache expires).
        Thread.sleep(forTimeInterval: 1.1)
        #expect(try h.fs.getattr(snap).linkCount == 2)
        expectErrno(.fileExists) { _ = try h.fs.link(snap, newParent: try pool(h, "vms"), newName: "vm_disk") }
        expectErrno(.invalidArgument) { _ = try h.fs.link(base, newParent: try pool(h), newName: "other@snap") }
    }

    @Test func clonesDeeperThanTheLimitAreFlattened() throws {
        var options = FSOptions()
        options.maxCloneDepth = 2
        let h = try Harness(options: options) { store in
            try store.createImage(ImageSpec(pool: "images", name: "root"), size: mib, options: .init())
        }
        var current = "root"
        for depth in 1...3 {
            _ = try h.fs.link(try h.path("images", current), newParent: try pool(h), newName: "\(current)@s")
            _ = try h.fs.link(try h.path("images", "\(current)@s"), newParent: try pool(h), newName: "c\(depth)")
            current = "c\(depth)"
        }
        let info = { (name: String) in try h.store.openImage(ImageSpec(pool: "images", name: name), snapshot: nil, readOnly: true).info() }
        #expect(try info("c2").parent != nil)
        #expect(try info("c3").parent == nil)
    }

    @Test func removeRefusesWhatLibrbdRefusesAndSnapshotsInUse() throws {
        let h = try Harness { store in
            try store.createImage(ImageSpec(pool: "images", name: "img"), size: mib, options: .init())
        }
        let images = try pool(h)
        _ = try h.fs.link(try h.path("images", "img"), newParent: images, newName: "img@s")
        _ = try h.fs.link(try h.path("images", "img@s"), newParent: images, newName: "child")
        expectErrno(.directoryNotEmpty) { try h.fs.unlink(parent: images, name: "img") }
        expectErrno(.resourceBusy) { try h.fs.unlink(parent: images, name: "img@s") }
        try h.fs.unlink(parent: images, name: "child")
        try h.fs.unlink(parent: images, name: "img@s")
        try h.fs.unlink(parent: images, name: "img")
        #expect(try h.store.listImages(pool: "images", namespace: "").isEmpty)
    }

    @Test func renameWithinAPoolOnlyAndNeverOntoAnExistingImage() throws {
        let h = try Harness { store in
            for name in ["a", "b"] { try store.createImage(ImageSpec(pool: "images", name: name), size: mib, options: .init()) }
        }
        let images = try pool(h)
        expectErrno(.fileExists) { try h.fs.rename(parent: images, name: "a", newParent: images, newName: "b") }
        expectErrno(.improperLink) { try h.fs.rename(parent: images, name: "a", newParent: try pool(h, "vms"), newName: "a") }
        try h.fs.rename(parent: images, name: "a", newParent: images, newName: "c")
        #expect(try h.store.listImages(pool: "images", namespace: "").sorted() == ["b", "c"])
    }

    @Test func directoriesArePoolsAndNamespaces() throws {
        let h = try Harness()
        _ = try h.fs.makeDirectory(parent: InodeTable.rootInode, name: "newpool")
        #expect(try h.store.listPools().contains { $0.name == "newpool" && $0.isRBD })
        _ = try h.fs.makeDirectory(parent: try pool(h), name: "tenant")
        #expect(try h.store.listNamespaces(pool: "images") == ["tenant"])
        expectErrno(.fileExists) { _ = try h.fs.makeDirectory(parent: try pool(h), name: "tenant") }
        expectErrno(.notPermitted) { try h.fs.removeDirectory(parent: InodeTable.rootInode, name: "newpool") }
        try h.fs.removeDirectory(parent: try pool(h), name: "tenant")
        #expect(try h.store.listNamespaces(pool: "images").isEmpty)
    }

    @Test func extendedAttributesDescribeTheImage() throws {
        let h = try Harness { store in
            try store.createImage(ImageSpec(pool: "images", name: "img"), size: mib, options: .init())
        }
        let img = try h.path("images", "img")
        _ = try h.fs.link(img, newParent: try pool(h), newName: "img@snap")
        let snap = try h.path("images", "img@snap")
        let names = try h.fs.listExtendedAttributes(snap)
        #expect(names.contains("user.rbd.protected") && names.contains("user.rbd.children"))
        #expect(String(decoding: try h.fs.extendedAttribute(snap, name: "user.rbd.protected"), as: UTF8.self) == "true")
        #expect(String(decoding: try h.fs.extendedAttribute(snap, name: "user.rbd.location"), as: UTF8.self)
                == "rbd://\(MemoryStore.defaultFSID)/images/img/snap")
        #expect(String(decoding: try h.fs.extendedAttribute(img, name: "user.rbd.features"), as: UTF8.self)
                == "layering, exclusive-lock, object-map, fast-diff, deep-flatten")
        expectErrno(.init(rawValue: 61)) { _ = try h.fs.extendedAttribute(img, name: "user.rbd.nope") }
        expectErrno(.notSupported) { try h.fs.setExtendedAttribute(img, name: "user.rbd.id", value: [1]) }
        // Setting the value it already has is accepted (cp -a, mv across pools copy attributes).
        try h.fs.setExtendedAttribute(img, name: "user.rbd.format", value: Array("2".utf8))
    }
}
