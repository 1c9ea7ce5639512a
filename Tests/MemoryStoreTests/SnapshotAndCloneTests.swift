import MemoryStore
import Storage
import SystemPackage
import Testing

let base = ImageSpec(pool: "images", name: "base")

/// `images/base`: 4 objects of 4 KiB full of `0xBB`, frozen as the protected snapshot `snap`, as Glance
/// leaves an upload; the returned handle is the base image's head, read-write.
func makeProtectedBase(_ store: MemoryStore) async throws -> any ImageHandle {
    try store.createImage(base, size: 4 * 4096, options: smallObjects)
    let handle = try store.openImage(base, snapshot: nil, readOnly: false)
    try await handle.write(at: 0, [UInt8](repeating: 0xBB, count: 4 * 4096))
    try handle.createSnapshot("snap")
    try handle.protectSnapshot("snap")
    return handle
}

@Suite struct SnapshotTests {
    @Test func snapshotsFreezeDataAndSize() async throws {
        let clock = ManualClock()
        let store = makeStore(clock: { clock.now })
        let handle = try makeSmallImage(store)
        try await handle.write(at: 0, pattern(8192, seed: 1))
        try handle.createSnapshot("one")
        clock.advance(by: 5)
        try await handle.write(at: 100, pattern(100, seed: 99))
        try handle.resize(to: 3 * 4096)
        try handle.createSnapshot("two")

        let snapshots = try handle.snapshots()
        #expect(snapshots.map(\.name) == ["one", "two"])
        #expect(snapshots[0].id < snapshots[1].id)
        #expect(snapshots.map(\.size) == [5 * 4096, 3 * 4096])
        #expect(snapshots[1].timestamp == clock.now && !snapshots[0].isProtected)

        let one = try store.openImage(handle.spec, snapshot: "one", readOnly: true)
        #expect(try one.size() == 5 * 4096)
        #expect(try one.info().size == 5 * 4096)
        #expect(try await one.read(at: 0, count: 8192) == pattern(8192, seed: 1))
        #expect(try one.usedBytes() == 2 * 4096)
        #expect(try one.allocatedExtents(in: 0..<(5 * 4096)) == [0..<8192])
        #expect(Array(try await handle.read(at: 100, count: 100)) == pattern(100, seed: 99))

        // Changing the head after the snapshot leaves it as it was (copy-on-write).
        try await handle.discard(at: 0, length: 3 * 4096)
        #expect(store.rawObjectCount(of: handle.spec) == 0)
        #expect(try await one.read(at: 0, count: 8192) == pattern(8192, seed: 1))
    }

    @Test func snapshotNameErrors() throws {
        let store = makeStore()
        let handle = try makeSmallImage(store)
        try handle.createSnapshot("s")
        #expect(failure { try handle.createSnapshot("s") }
                == StorageError(.fileExists, operation: "rbd_snap_create", target: "images/img@s"))
        #expect(failure { try handle.removeSnapshot("x") }
                == StorageError(.noSuchFileOrDirectory, operation: "rbd_snap_remove", target: "images/img@x"))
        try handle.createSnapshot("t")
        #expect(failure { try handle.renameSnapshot("s", to: "t") }?.errno == .fileExists)
        #expect(failure { try handle.renameSnapshot("x", to: "y") }?.errno == .noSuchFileOrDirectory)
        try handle.renameSnapshot("s", to: "u")
        #expect(try handle.snapshots().map(\.name) == ["u", "t"])
    }

    @Test func snapshotHandleFailsOnceItsSnapshotIsRemoved() async throws {
        let store = makeStore()
        let handle = try makeSmallImage(store)
        try handle.createSnapshot("s")
        let snapshot = try store.openImage(handle.spec, snapshot: "s", readOnly: true)
        try handle.removeSnapshot("s")
        #expect(await asyncFailure { _ = try await snapshot.read(at: 0, count: 1) }
                == StorageError(.noSuchFileOrDirectory, operation: "rbd_aio_read", target: "images/img@s"))
    }

    @Test func protectionRules() async throws {
        let store = makeStore()
        let handle = try await makeProtectedBase(store)
        #expect(try handle.snapshots().first?.isProtected == true)
        #expect(failure { try handle.protectSnapshot("snap") }
                == StorageError(.resourceBusy, operation: "rbd_snap_protect", target: "images/base@snap"))
        #expect(failure { try handle.removeSnapshot("snap") }
                == StorageError(.resourceBusy, operation: "rbd_snap_remove", target: "images/base@snap"))
        #expect(failure { try handle.protectSnapshot("nope") }?.errno == .noSuchFileOrDirectory)

        let clone = ImageSpec(pool: "vms", name: "disk")
        try store.cloneImage(parent: base, snapshot: "snap", child: clone, options: ImageCreateOptions())
        #expect(failure { try handle.unprotectSnapshot("snap") }
                == StorageError(.resourceBusy, operation: "rbd_snap_unprotect", target: "images/base@snap"))
        try store.removeImage(clone)
        try handle.unprotectSnapshot("snap")
        #expect(failure { try handle.unprotectSnapshot("snap") }
                == StorageError(.invalidArgument, operation: "rbd_snap_unprotect", target: "images/base@snap"))
        try handle.removeSnapshot("snap")
    }

    @Test func protectionNeedsLayering() throws {
        let store = makeStore()
        let spec = ImageSpec(pool: "images", name: "flat")
        try store.createImage(spec, size: MiB, options: ImageCreateOptions(features: 0))
        let handle = try store.openImage(spec, snapshot: nil, readOnly: false)
        try handle.createSnapshot("s")
        #expect(failure { try handle.protectSnapshot("s") }?.errno == .noFunction)
    }
}

@Suite struct CloneTests {
    @Test func cloneReadsThroughItsParentSnapshot() async throws {
        let store = makeStore()
        let parent = try await makeProtectedBase(store)
        let spec = ImageSpec(pool: "vms", name: "disk")
        try store.cloneImage(parent: base, snapshot: "snap", child: spec, options: ImageCreateOptions())
        // Later changes to the parent's head do not show: the clone reads the snapshot.
        try await parent.write(at: 0, [1, 2, 3])

        let clone = try store.openImage(spec, snapshot: nil, readOnly: false)
        let info = try clone.info()
        #expect(info.size == 4 * 4096 && info.objectSize == 4096)  // the parent's object size by default
        #expect(info.parent == ParentInfo(image: base, snapshot: "snap", overlap: 4 * 4096))
        #expect(info.features == MemoryStore.defaultFeatures)
        #expect(try await clone.read(at: 0, count: 4 * 4096) == [UInt8](repeating: 0xBB, count: 4 * 4096))
        #expect(try store.children(of: base, snapshot: "snap") == [spec])

        // A fresh clone owns nothing, yet its data is all there.
        #expect(store.rawObjectCount(of: spec) == 0)
        #expect(try clone.usedBytes() == 0)
        #expect(try clone.allocatedExtents(in: 0..<(4 * 4096)) == [0..<(4 * 4096)])
    }

    @Test func partialWriteCopiesUpTheParentObject() async throws {
        let store = makeStore()
        _ = try await makeProtectedBase(store)
        let spec = ImageSpec(pool: "vms", name: "disk")
        try store.cloneImage(parent: base, snapshot: "snap", child: spec, options: ImageCreateOptions())
        let clone = try store.openImage(spec, snapshot: nil, readOnly: false)

        try await clone.write(at: 4096 + 10, [1, 2])
        #expect(store.rawObjectCount(of: spec) == 1)
        #expect(try clone.usedBytes() == 4096)
        let object = try await clone.read(at: 4096, count: 4096)
        #expect(Array(object[..<10]) == [UInt8](repeating: 0xBB, count: 10))
        #expect(Array(object[10..<12]) == [1, 2])
        #expect(Array(object[12...]) == [UInt8](repeating: 0xBB, count: 4096 - 12))
    }

    @Test func discardAndZeroesInACloneNeverUncoverTheParent() async throws {
        let store = makeStore()
        _ = try await makeProtectedBase(store)
        let spec = ImageSpec(pool: "vms", name: "disk")
        try store.cloneImage(parent: base, snapshot: "snap", child: spec, options: ImageCreateOptions())
        let clone = try store.openImage(spec, snapshot: nil, readOnly: false)

        try await clone.write(at: 0, [UInt8](repeating: 0xCC, count: 4096))
        try await clone.discard(at: 0, length: 2 * 4096)
        #expect(try await clone.read(at: 0, count: 2 * 4096) == zeros(2 * 4096))
        try await clone.writeZeroes(at: 2 * 4096 + 100, length: 50)
        let third = try await clone.read(at: 2 * 4096, count: 4096)
        #expect(Array(third[..<100]) == [UInt8](repeating: 0xBB, count: 100))
        #expect(Array(third[100..<150]) == zeros(50))
        #expect(Array(third[150...]) == [UInt8](repeating: 0xBB, count: 4096 - 150))
        #expect(try await clone.read(at: 3 * 4096, count: 4096) == [UInt8](repeating: 0xBB, count: 4096))
    }

    @Test func shrinkingACloneLowersItsOverlapForGood() async throws {
        let store = makeStore()
        _ = try await makeProtectedBase(store)
        let spec = ImageSpec(pool: "vms", name: "disk")
        try store.cloneImage(parent: base, snapshot: "snap", child: spec, options: ImageCreateOptions())
        let clone = try store.openImage(spec, snapshot: nil, readOnly: false)
        try clone.resize(to: 4096 + 10)
        #expect(try clone.info().parent?.overlap == 4096 + 10)
        try clone.resize(to: 8 * 4096)
        let data = try await clone.read(at: 0, count: 8 * 4096)
        #expect(Array(data[..<(4096 + 10)]) == [UInt8](repeating: 0xBB, count: 4096 + 10))
        #expect(Array(data[(4096 + 10)...]) == zeros(7 * 4096 - 10))
        #expect(try clone.allocatedExtents(in: 0..<(8 * 4096)) == [0..<(2 * 4096)])

        // Past the overlap there is nothing of the parent's to hide.
        try await clone.write(at: 5 * 4096, [1])
        try await clone.discard(at: 4 * 4096, length: 4 * 4096)
        try await clone.writeZeroes(at: 3 * 4096 + 1, length: 100)
        #expect(store.rawObjectCount(of: spec) == 0)
    }

    @Test func cloneErrors() async throws {
        let store = makeStore()
        let parent = try await makeProtectedBase(store)
        try parent.createSnapshot("loose")
        let child = ImageSpec(pool: "vms", name: "c")
        #expect(failure { try store.cloneImage(parent: base, snapshot: "loose", child: child,
                                               options: ImageCreateOptions()) }
                == StorageError(.invalidArgument, operation: "rbd_clone3", target: "images/base@loose"))
        #expect(failure { try store.cloneImage(parent: base, snapshot: "nope", child: child,
                                               options: ImageCreateOptions()) }?.errno == .noSuchFileOrDirectory)
        #expect(failure { try store.cloneImage(parent: ImageSpec(pool: "images", name: "nope"), snapshot: "snap",
                                               child: child, options: ImageCreateOptions()) }?.errno
                == .noSuchFileOrDirectory)
        #expect(failure { try store.cloneImage(parent: base, snapshot: "snap", child: base,
                                               options: ImageCreateOptions()) }
                == StorageError(.fileExists, operation: "rbd_clone3", target: "images/base"))
        #expect(failure { try store.cloneImage(parent: base, snapshot: "snap", child: child,
                                               options: ImageCreateOptions(features: 4)) }?.errno == .noFunction)
        #expect(failure { _ = try store.children(of: base, snapshot: "nope") }?.errno == .noSuchFileOrDirectory)
    }

    @Test func cloneInheritsTheParentsFeaturesUnlessTold() throws {
        let store = makeStore()
        let parent = ImageSpec(pool: "images", name: "layered")
        try store.createImage(parent, size: MiB, options: ImageCreateOptions(features: 1))
        let handle = try store.openImage(parent, snapshot: nil, readOnly: false)
        try handle.createSnapshot("s")
        try handle.protectSnapshot("s")
        let inherited = ImageSpec(pool: "vms", name: "a")
        try store.cloneImage(parent: parent, snapshot: "s", child: inherited, options: ImageCreateOptions())
        #expect(try store.openImage(inherited, snapshot: nil, readOnly: true).info().features == 1)
        let told = ImageSpec(pool: "vms", name: "b")
        try store.cloneImage(parent: parent, snapshot: "s", child: told, options: ImageCreateOptions(features: 61))
        #expect(try store.openImage(told, snapshot: nil, readOnly: true).info().features == 61)
    }

    @Test func clonesOfClonesReadThroughTheChain() async throws {
        let store = makeStore()
        _ = try await makeProtectedBase(store)
        let middle = ImageSpec(pool: "volumes", namespace: "", name: "middle")
        try store.cloneImage(parent: base, snapshot: "snap", child: middle, options: ImageCreateOptions())
        let middleHandle = try store.openImage(middle, snapshot: nil, readOnly: false)
        try await middleHandle.write(at: 0, [7])
        try middleHandle.createSnapshot("s")
        try middleHandle.protectSnapshot("s")

        try store.createNamespace(pool: "vms", name: "project")
        let leaf = ImageSpec(pool: "vms", namespace: "project", name: "leaf")
        try store.cloneImage(parent: middle, snapshot: "s", child: leaf,
                             options: ImageCreateOptions(objectSize: 8192))
        let leafHandle = try store.openImage(leaf, snapshot: nil, readOnly: true)
        #expect(try leafHandle.info().objectSize == 8192)
        let data = try await leafHandle.read(at: 0, count: 4 * 4096)
        #expect(data[0] == 7 && data[1...].allSatisfy { $0 == 0xBB })
        #expect(try leafHandle.allocatedExtents(in: 0..<(4 * 4096)) == [0..<(4 * 4096)])
    }

    @Test func flattenCopiesTheParentInAndDetaches() async throws {
        let store = makeStore()
        let parent = try await makeProtectedBase(store)
        let spec = ImageSpec(pool: "vms", name: "disk")
        try store.cloneImage(parent: base, snapshot: "snap", child: spec, options: ImageCreateOptions())
        let clone = try store.openImage(spec, snapshot: nil, readOnly: false)
        try await clone.write(at: 0, [1])

        let steps = AsyncBox<[UInt64]>()
        steps.set([])
        try clone.flatten { done, total in
            #expect(total == 4)
            steps.set(steps.value! + [done])
        }
        #expect(steps.value == [1, 2, 3, 4])
        #expect(try clone.info().parent == nil)
        #expect(store.rawObjectCount(of: spec) == 4)
        #expect(try store.children(of: base, snapshot: "snap") == [])
        let data = try await clone.read(at: 0, count: 4 * 4096)
        #expect(data[0] == 1 && data[1...].allSatisfy { $0 == 0xBB })
        try parent.unprotectSnapshot("snap")

        #expect(failure { try clone.flatten(progress: nil) }
                == StorageError(.invalidArgument, operation: "rbd_flatten_with_progress", target: "vms/disk"))
    }

    @Test func aFlattenedCloneWithSnapshotsStaysAChild() async throws {
        let store = makeStore()
        let parent = try await makeProtectedBase(store)
        let spec = ImageSpec(pool: "vms", name: "disk")
        try store.cloneImage(parent: base, snapshot: "snap", child: spec, options: ImageCreateOptions())
        let clone = try store.openImage(spec, snapshot: nil, readOnly: false)
        try clone.createSnapshot("before")
        try clone.flatten(progress: nil)
        // Its snapshot still reads through the parent, as in librbd.
        #expect(try store.children(of: base, snapshot: "snap") == [spec])
        #expect(failure { try parent.unprotectSnapshot("snap") }?.errno == .resourceBusy)
        let before = try store.openImage(spec, snapshot: "before", readOnly: true)
        #expect(try before.info().parent?.snapshot == "snap")
        #expect(try before.usedBytes() == 0)
        try clone.removeSnapshot("before")
        #expect(try store.children(of: base, snapshot: "snap") == [])
    }
}

@Suite struct SnapshotDetailsTests {
    /// `describeSnapshots` reports, for many snapshots at once, what a handle open at each reports.
    @Test func describesSnapshotsAsTheirHandlesReportThem() async throws {
        let store = makeStore()
        let head = try await makeProtectedBase(store)
        defer { head.close() }
        try await head.discard(at: 0, length: 2 * 4096)
        try head.createSnapshot("later")
        let clones = [ImageSpec(pool: "vms", name: "b"), ImageSpec(pool: "images", name: "a")]
        for clone in clones {
            try store.cloneImage(parent: base, snapshot: "snap", child: clone, options: smallObjects)
        }
        let summary = try #require(try store.describeImages(pool: "images", namespace: "", names: ["base"])["base"]?.get())
        var references = summary.snapshots.map { SnapshotReference(image: base, imageID: summary.info.id, snapshot: $0) }
        let gone = SnapshotReference(image: base, imageID: summary.info.id,
                                     snapshot: SnapshotInfo(id: 99, name: "gone", size: 0, timestamp: .zero,
                                                            isProtected: false))
        references.append(gone)

        let details = store.describeSnapshots(references)
        #expect(details.count == 3)
        for reference in references.dropLast() {
            let handle = try store.openImage(base, snapshot: reference.snapshot.name, readOnly: true)
            defer { handle.close() }
            #expect(try details[reference]?.get() == SnapshotDetails(children: try handle.children(),
                                                                    usedBytes: try handle.usedBytes()))
        }
        #expect(try details[references[0]]?.get() == SnapshotDetails(children: clones.reversed(), usedBytes: 4 * 4096))
        #expect(try details[references[1]]?.get() == SnapshotDetails(children: [], usedBytes: 2 * 4096))
        #expect(throws: StorageError(.noSuchFileOrDirectory, operation: "describe_snapshot", target: "images/base@gone")) {
            try details[gone]?.get()
        }
        #expect(store.callCount("describe_snapshot") == 3)

        // A fault fails only the snapshot it names.
        store.injectFault(.ioError, operation: "describe_snapshot", image: "images/base@later")
        let faulted = store.describeSnapshots(Array(references.prefix(2)))
        #expect(try faulted[references[0]]?.get().usedBytes == 4 * 4096)
        #expect(throws: StorageError(.ioError, operation: "describe_snapshot", target: "images/base@later")) {
            try faulted[references[1]]?.get()
        }
    }
}
