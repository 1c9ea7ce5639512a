import RBDFS
import Storage
import Testing

@Suite struct NamesTests {
    @Test func plainImageName() throws {
        #expect(try Names.parseFileName("disk") == .image("disk"))
        #expect(try Names.parseFileName("a.b-c_d") == .image("a.b-c_d"))
    }

    @Test func snapshotName() throws {
        #expect(try Names.parseFileName("disk@snap") == .snapshot(image: "disk", snapshot: "snap"))
        #expect(ImageFileName.snapshot(image: "disk", snapshot: "snap").fileName == "disk@snap")
    }

    @Test(arguments: ["", ".", "..", "@snap", "disk@", "a@b@c", "@"])
    func refusedNames(_ name: String) {
        #expect(throws: NameError.self) { try Names.parseFileName(name) }
    }

    @Test func overLongNamesAreRefusedNotTruncated() throws {
        let long = String(repeating: "x", count: Names.maxImageNameBytes + 1)
        #expect(throws: NameError.tooLong(long, limit: Names.maxImageNameBytes)) { try Names.parseFileName(long) }
        #expect(throws: NameError.tooLong(long, limit: Names.maxImageNameBytes)) { try Names.parseFileName("img@" + long) }
        let fits = String(repeating: "x", count: Names.maxImageNameBytes)
        #expect(try Names.parseFileName(fits) == .image(fits))
    }

    @Test func unrepresentableImageNamesAreHidden() {
        #expect(Names.isRepresentable(imageName: "ok"))
        #expect(!Names.isRepresentable(imageName: "has@at"))
        #expect(!Names.isRepresentable(imageName: ""))
    }

    @Test func nodePathsReadLikeTheRbdCLI() {
        let spec = ImageSpec(pool: "images", namespace: "ns", name: "disk")
        #expect(NodeKey.image(spec).description == "images/ns/disk")
        #expect(NodeKey.snapshot(ImageSpec(pool: "images", name: "disk"), name: "snap").description == "images/disk@snap")
    }
}

@Suite struct InodeTableTests {
    @Test func lookupsCountAndForgetDrops() {
        let table = InodeTable(rootKey: .root)
        let key = NodeKey.pool("images")
        let inode = table.remember(key)
        #expect(table.remember(key) == inode)
        #expect(table.lookupCount(of: inode) == 2)
        table.forget(inode, count: 1)
        #expect(table.key(of: inode) == key)
        table.forget(inode, count: 1)
        #expect(table.key(of: inode) == nil)
        // A new lookup after the drop gets a new inode, never the old one reused for something else.
        #expect(table.remember(key) != inode)
    }

    @Test func rootIsNeverForgotten() {
        let table = InodeTable(rootKey: .pool("images"))
        table.forget(InodeTable.rootInode, count: 5)
        #expect(table.key(of: InodeTable.rootInode) == .pool("images"))
    }

    @Test func renameKeepsTheInode() {
        let table = InodeTable(rootKey: .root)
        let old = NodeKey.image(ImageSpec(pool: "p", name: "a"))
        let new = NodeKey.image(ImageSpec(pool: "p", name: "b"))
        let inode = table.remember(old)
        table.rename(old, to: new)
        #expect(table.key(of: inode) == new)
        #expect(table.existingInode(of: old) == nil)
    }
}

@Suite struct ObjectExtentsTests {
    let mib: UInt64 = 1 << 20

    @Test func splitsAtObjectBoundaries() {
        let pieces = ObjectExtents.split(offset: 3 * mib, length: 6 * mib, objectSize: 4 * mib)
        #expect(pieces == [3 * mib..<4 * mib, 4 * mib..<8 * mib, 8 * mib..<9 * mib])
    }

    @Test func requestInsideOneObjectIsOnePiece() {
        #expect(ObjectExtents.split(offset: 4096, length: 4096, objectSize: 4 * mib) == [4096..<8192])
        #expect(ObjectExtents.split(offset: 0, length: 0, objectSize: 4 * mib).isEmpty)
    }

    @Test func growsInLargeObjectAlignedSteps() {
        // An empty image written by a streaming copy grows by 64 MiB at least...
        #expect(ObjectExtents.grownSize(current: 0, needed: mib, objectSize: 4 * mib) == 64 * mib)
        // ...by its own size while that is below 1 GiB...
        #expect(ObjectExtents.grownSize(current: 256 * mib, needed: 257 * mib, objectSize: 4 * mib) == 512 * mib)
        // ...by 1 GiB beyond that, and always at least to what the write needs.
        #expect(ObjectExtents.grownSize(current: 4096 * mib, needed: 4097 * mib, objectSize: 4 * mib) == 5120 * mib)
        #expect(ObjectExtents.grownSize(current: 0, needed: 100 * mib + 1, objectSize: 4 * mib) == 104 * mib)
    }
}

@Suite struct ErrnoMappingTests {
    @Test func storageErrorsPassTheirErrnoThrough() {
        let error = StorageError(.resourceBusy, operation: "rbd_remove", target: "images/disk")
        #expect(FSError.storage(error).errno == .resourceBusy)
        #expect(FSError.storage(error).description.contains("rbd_remove on images/disk"))
    }

    @Test func theClusterRefusingAClientIsPermissionDenied() {
        let error = StorageError(.notPermitted, operation: "rbd_list2", target: "vms")
        #expect(FSError.storage(error).errno == .permissionDenied)
    }

    @Test func refusalsHaveTheDocumentedErrno() {
        #expect(FSError.readOnly("p/i@s", reason: "snapshot").errno == .readOnlyFileSystem)
        #expect(FSError.invalidName(.invalid("a@b@c", reason: "x")).errno == .invalidArgument)
        #expect(FSError.invalidName(.tooLong("x", limit: 95)).errno == .fileNameTooLong)
        #expect(FSError.notPermitted("p/i", reason: "shrink").errno == .notPermitted)
        #expect(FSError.crossDevice("p/i").errno == .improperLink)
        #expect(FSError.noAttribute("user.x").errno.rawValue == 61)
        #expect(FSError.notFound("p/i").errno == .noSuchFileOrDirectory)
    }
}
