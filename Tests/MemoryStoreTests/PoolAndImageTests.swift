import MemoryStore
import Storage
import SystemPackage
import Testing

@Suite struct PoolTests {
    @Test func defaultPoolsAreRBDPoolsInCreationOrder() throws {
        let store = makeStore()
        let pools = try store.listPools()
        #expect(pools.map(\.name) == ["images", "volumes", "vms"])
        #expect(pools.allSatisfy { $0.isRBD })
        #expect(pools.map(\.id) == pools.map(\.id).sorted())
        #expect(try store.fsid() == MemoryStore.defaultFSID)
        #expect(try MemoryStore(pools: [], fsid: "f00").fsid() == "f00")
    }

    @Test func createAndDeletePool() throws {
        let store = makeStore()
        try store.createPool("backups")
        #expect(try store.listPools().last?.name == "backups")
        #expect(failure { try store.createPool("backups") }
                == StorageError(.fileExists, operation: "rados_pool_create", target: "backups"))
        try store.deletePool("backups")
        #expect(failure { try store.deletePool("backups") }
                == StorageError(.noSuchFileOrDirectory, operation: "rados_pool_delete", target: "backups"))
        #expect(failure { _ = try store.listImages(pool: "backups", namespace: "") }?.errno == .noSuchFileOrDirectory)
    }

    @Test func deletingAPoolDeletesItsImagesAndOrphansClonesElsewhere() async throws {
        let store = makeStore()
        let parent = ImageSpec(pool: "images", name: "base")
        try store.createImage(parent, size: 8 * KiB, options: smallObjects)
        let handle = try store.openImage(parent, snapshot: nil, readOnly: false)
        try await handle.write(at: 0, pattern(100))
        try handle.createSnapshot("snap")
        try handle.protectSnapshot("snap")
        handle.close()
        let clone = ImageSpec(pool: "vms", name: "disk")
        try store.cloneImage(parent: parent, snapshot: "snap", child: clone, options: ImageCreateOptions())

        try store.deletePool("images")
        #expect(store.rawObjectCount(of: parent) == 0)
        #expect(failure { _ = try store.openImage(clone, snapshot: nil, readOnly: true) }?.errno
                == .noSuchFileOrDirectory)
    }
}

@Suite struct NamespaceTests {
    @Test func namespacesHoldTheirOwnImages() throws {
        let store = makeStore()
        try store.createNamespace(pool: "volumes", name: "tenant1")
        try store.createNamespace(pool: "volumes", name: "a")
        #expect(try store.listNamespaces(pool: "volumes") == ["a", "tenant1"])
        #expect(try store.listNamespaces(pool: "images") == [])

        try store.createImage(ImageSpec(pool: "volumes", namespace: "tenant1", name: "v"), size: MiB,
                              options: ImageCreateOptions())
        #expect(try store.listImages(pool: "volumes", namespace: "tenant1") == ["v"])
        #expect(try store.listImages(pool: "volumes", namespace: "") == [])
        // The same name in another namespace is another image.
        try store.createImage(ImageSpec(pool: "volumes", name: "v"), size: MiB, options: ImageCreateOptions())
    }

    @Test func namespaceErrors() throws {
        let store = makeStore()
        try store.createNamespace(pool: "volumes", name: "t")
        #expect(failure { try store.createNamespace(pool: "volumes", name: "t") }
                == StorageError(.fileExists, operation: "rbd_namespace_create", target: "volumes/t"))
        #expect(failure { try store.createNamespace(pool: "nope", name: "t") }?.errno == .noSuchFileOrDirectory)
        #expect(failure { try store.removeNamespace(pool: "volumes", name: "other") }
                == StorageError(.noSuchFileOrDirectory, operation: "rbd_namespace_remove", target: "volumes/other"))
        #expect(failure { _ = try store.listImages(pool: "volumes", namespace: "other") }?.errno
                == .noSuchFileOrDirectory)

        let spec = ImageSpec(pool: "volumes", namespace: "t", name: "v")
        try store.createImage(spec, size: MiB, options: ImageCreateOptions())
        #expect(failure { try store.removeNamespace(pool: "volumes", name: "t") }
                == StorageError(.resourceBusy, operation: "rbd_namespace_remove", target: "volumes/t"))
        try store.removeImage(spec)
        try store.removeNamespace(pool: "volumes", name: "t")
        #expect(try store.listNamespaces(pool: "volumes") == [])
    }
}

@Suite struct ImageTests {
    @Test func newImageHasLibrbdDefaults() throws {
        let clock = ManualClock()
        let store = makeStore(clock: { clock.now })
        let spec = ImageSpec(pool: "images", name: "cirros")
        try store.createImage(spec, size: 10 * GiB, options: ImageCreateOptions())
        let handle = try store.openImage(spec, snapshot: nil, readOnly: true)
        let info = try handle.info()
        #expect(info.size == 10 * GiB)
        #expect(info.objectSize == 4 * MiB)
        #expect(info.order == 22)
        #expect(info.features == 61)
        #expect(info.format == 2)
        #expect(info.flags == 0)
        #expect(!info.id.isEmpty && info.id.allSatisfy(\.isHexDigit))
        #expect(info.blockNamePrefix == "rbd_data.\(info.id)")
        #expect(info.createTime == clock.now && info.modifyTime == clock.now && info.accessTime == clock.now)
        #expect(info.parent == nil)
        #expect(try handle.snapshots() == [])
        #expect(try handle.size() == 10 * GiB)
        #expect(handle.spec == spec && handle.snapshot == nil && handle.isReadOnly)
    }

    @Test func createOptionsAreHonouredAndValidated() throws {
        let store = makeStore()
        let spec = ImageSpec(pool: "images", name: "x")
        try store.createImage(spec, size: MiB, options: ImageCreateOptions(objectSize: 64 * KiB, features: 1))
        let info = try store.openImage(spec, snapshot: nil, readOnly: true).info()
        #expect(info.objectSize == 64 * KiB && info.order == 16 && info.features == 1)

        func createError(_ options: ImageCreateOptions) -> StorageError? {
            failure { try store.createImage(ImageSpec(pool: "images", name: "y"), size: MiB, options: options) }
        }
        #expect(createError(ImageCreateOptions(objectSize: 3 * MiB))
                == StorageError(.invalidArgument, operation: "rbd_create4", target: "images/y"))
        #expect(createError(ImageCreateOptions(objectSize: 0))?.errno == .invalidArgument)
        // librbd: order outside 12...25 is EDOM.
        #expect(createError(ImageCreateOptions(objectSize: 2 * KiB))?.errno == .outOfDomain)
        #expect(createError(ImageCreateOptions(objectSize: 64 * MiB))?.errno == .outOfDomain)
        #expect(createError(ImageCreateOptions(features: 1 | 8))?.errno == .invalidArgument)  // object-map alone
        #expect(createError(ImageCreateOptions(features: 1 | 4 | 16))?.errno == .invalidArgument)  // fast-diff alone
        #expect(createError(ImageCreateOptions(features: 1 << 20))?.errno == .noFunction)
        #expect(try store.listImages(pool: "images", namespace: "") == ["x"])
    }

    @Test func createErrors() throws {
        let store = makeStore()
        let spec = ImageSpec(pool: "images", name: "x")
        try store.createImage(spec, size: MiB, options: ImageCreateOptions())
        #expect(failure { try store.createImage(spec, size: MiB, options: ImageCreateOptions()) }
                == StorageError(.fileExists, operation: "rbd_create4", target: "images/x"))
        #expect(failure { try store.createImage(ImageSpec(pool: "nope", name: "x"), size: MiB,
                                                options: ImageCreateOptions()) }?.errno == .noSuchFileOrDirectory)
        #expect(failure { try store.createImage(ImageSpec(pool: "images", namespace: "nope", name: "x"), size: MiB,
                                                options: ImageCreateOptions()) }?.errno == .noSuchFileOrDirectory)
    }

    @Test func openErrors() throws {
        let store = makeStore()
        let spec = ImageSpec(pool: "images", name: "x")
        #expect(failure { _ = try store.openImage(spec, snapshot: nil, readOnly: false) }
                == StorageError(.noSuchFileOrDirectory, operation: "rbd_open", target: "images/x"))
        try store.createImage(spec, size: MiB, options: ImageCreateOptions())
        #expect(failure { _ = try store.openImage(spec, snapshot: "s", readOnly: false) }
                == StorageError(.noSuchFileOrDirectory, operation: "rbd_open_read_only", target: "images/x@s"))
    }

    @Test func removeImageFollowsLibrbd() throws {
        let store = makeStore()
        let spec = ImageSpec(pool: "images", name: "x")
        #expect(failure { try store.removeImage(spec) }
                == StorageError(.noSuchFileOrDirectory, operation: "rbd_remove", target: "images/x"))
        try store.createImage(spec, size: MiB, options: ImageCreateOptions())

        // A read-write handle is a watcher: EBUSY until it closes (rbdfs's own cached handle included).
        let writer = try store.openImage(spec, snapshot: nil, readOnly: false)
        #expect(failure { try store.removeImage(spec) }
                == StorageError(.resourceBusy, operation: "rbd_remove", target: "images/x"))

        // Snapshots are checked first: ENOTEMPTY.
        try writer.createSnapshot("s")
        #expect(failure { try store.removeImage(spec) }?.errno == .directoryNotEmpty)
        try writer.removeSnapshot("s")
        writer.close()

        // A read-only handle is no watcher; once the image is gone it answers ENOENT.
        let reader = try store.openImage(spec, snapshot: nil, readOnly: true)
        try store.removeImage(spec)
        #expect(try store.listImages(pool: "images", namespace: "") == [])
        #expect(failure { _ = try reader.size() }?.errno == .noSuchFileOrDirectory)
        reader.close()
    }

    @Test func removingAParentWithClonesIsRefusedAsLibrbdDoes() throws {
        let store = makeStore()
        let parent = ImageSpec(pool: "images", name: "base")
        try store.createImage(parent, size: MiB, options: ImageCreateOptions())
        let handle = try store.openImage(parent, snapshot: nil, readOnly: false)
        try handle.createSnapshot("snap")
        try handle.protectSnapshot("snap")
        handle.close()
        try store.cloneImage(parent: parent, snapshot: "snap", child: ImageSpec(pool: "vms", name: "c"),
                             options: ImageCreateOptions())
        // The clones hang off a snapshot, which librbd reports first.
        #expect(failure { try store.removeImage(parent) }?.errno == .directoryNotEmpty)
    }

    @Test func renameKeepsOpenHandlesAndParentLinks() async throws {
        let store = makeStore()
        let spec = ImageSpec(pool: "images", name: "old")
        try store.createImage(spec, size: 8 * KiB, options: smallObjects)
        try store.createImage(ImageSpec(pool: "images", name: "taken"), size: MiB, options: ImageCreateOptions())
        let handle = try store.openImage(spec, snapshot: nil, readOnly: false)
        try await handle.write(at: 0, pattern(10))

        #expect(failure { try store.renameImage(spec, to: "taken") }
                == StorageError(.fileExists, operation: "rbd_rename", target: "images/taken"))
        #expect(failure { try store.renameImage(ImageSpec(pool: "images", name: "nope"), to: "x") }?.errno
                == .noSuchFileOrDirectory)
        try store.renameImage(spec, to: "new")
        #expect(try store.listImages(pool: "images", namespace: "") == ["new", "taken"])
        #expect(try await handle.read(at: 0, count: 10) == pattern(10))

        try handle.createSnapshot("s")
        try handle.protectSnapshot("s")
        let clone = ImageSpec(pool: "vms", name: "c")
        try store.cloneImage(parent: ImageSpec(pool: "images", name: "new"), snapshot: "s", child: clone,
                             options: ImageCreateOptions())
        try store.renameImage(ImageSpec(pool: "images", name: "new"), to: "newer")
        let parentInfo = try store.openImage(clone, snapshot: nil, readOnly: true).info().parent
        #expect(parentInfo?.image == ImageSpec(pool: "images", name: "newer"))
        handle.close()
    }

    @Test func describeImagesReportsEachNameOnItsOwn() throws {
        let store = makeStore()
        try store.createImage(ImageSpec(pool: "images", name: "a"), size: MiB, options: ImageCreateOptions())
        try store.createImage(ImageSpec(pool: "images", name: "b"), size: 2 * MiB, options: ImageCreateOptions())
        let handle = try store.openImage(ImageSpec(pool: "images", name: "b"), snapshot: nil, readOnly: false)
        try handle.createSnapshot("s1")
        handle.close()
        store.injectFault(.ioError, operation: "rbd_open_read_only", image: "a")

        let summaries = store.describeImages(pool: "images", namespace: "", names: ["a", "b", "gone"])
        #expect(summaries.count == 3)
        #expect(throws: StorageError(.ioError, operation: "rbd_open_read_only", target: "images/a")) {
            try summaries["a"]!.get()
        }
        let b = try summaries["b"]!.get()
        #expect(b.info.size == 2 * MiB)
        #expect(b.snapshots.map(\.name) == ["s1"])
        #expect(throws: StorageError(.noSuchFileOrDirectory, operation: "rbd_open_read_only",
                                     target: "images/gone")) {
            try summaries["gone"]!.get()
        }
    }
}
