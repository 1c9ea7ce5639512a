import Foundation
import Testing

/// The image lifecycle and the OpenStack conventions (issue 3, DESIGN.md §2) against the real local cluster
/// through a real mount: create, truncate, Glance upload to `name@snap`, snapshot / clone / volume clone by
/// `ln`, clone depth, rm, mv, mkdir / rmdir, link counts and `user.rbd.*` attributes, refused names.
/// Every result is checked with the `rbd` / `ceph` CLI, every refusal by its errno and an unchanged
/// `rbd export`.
@Suite(.enabled(if: Environment.isReady, Environment.skipReason))
struct ConventionsTests {
    init() { Environment.printSkipReasonOnce() }

    // MARK: - 1. Create

    @Test func cpMakesAnImageOfExactlyTheFileWithItsBytes() throws {
        let image = uniqueName("cp")
        let work = try Scratch(image)
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        // 20 MiB + 123 bytes: not a whole number of objects, and less than one growth step.
        try sh("head -c 20971643 /dev/urandom > \(work.f("src"))")
        try sh("cp \(work.f("src")) \(mount.q("images/"))/\(image)")
        #expect(try rbdInfo("images/\(image)").int("size") == 20_971_643)
        #expect(try rbdInfo("images/\(image)").int("format") == 2)
        #expect(try exportEquals("images/\(image)", work.path + "/src"))
        #expect(try sh("stat -c %s \(mount.q("images/\(image)"))").trimmed == "20971643")
    }

    @Test func touchMakesAnEmptyImageAndDdOfMakesANewOne() throws {
        let empty = uniqueName("touch"), written = uniqueName("ddnew")
        let work = try Scratch(written)
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(empty)", "images/\(written)"]) }
        try sh("touch \(mount.q("images/\(empty)"))")
        #expect(try rbdInfo("images/\(empty)").int("size") == 0)
        try sh("head -c 3145733 /dev/urandom > \(work.f("src"))")
        // No conv=notrunc: O_CREAT | O_TRUNC on a name that does not exist yet.
        try sh("dd if=\(work.f("src")) of=\(mount.q("images/\(written)")) bs=1M status=none")
        #expect(try rbdInfo("images/\(written)").int("size") == 3_145_733)
        #expect(try exportEquals("images/\(written)", work.path + "/src"))
    }

    @Test func objectSizeOptionSetsTheOrderOfNewImages() throws {
        let copied = uniqueName("order23"), touched = uniqueName("order23t")
        let work = try Scratch(copied)
        let mount = try MountedRBDFS(["--object-size", "8388608"])
        defer { cleanUp(mount, images: ["images/\(copied)", "images/\(touched)"]) }
        try sh("head -c 1048576 /dev/urandom > \(work.f("src")) && cp \(work.f("src")) \(mount.q("images/\(copied)"))")
        try sh("touch \(mount.q("images/\(touched)"))")
        for image in [copied, touched] {
            let info = try rbdInfo("images/\(image)")
            #expect(info.int("order") == 23, "\(image)")
            #expect(info.int("object_size") == 8_388_608, "\(image)")
        }
        #expect(try exportEquals("images/\(copied)", work.path + "/src"))
    }

    // MARK: - 2. Truncate and shrink

    @Test func growingWithTruncateIsFreeAndKeepsTheData() throws {
        let image = uniqueName("growtr")
        let work = try Scratch(image)
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        try sh("head -c 1048576 /dev/urandom > \(work.f("src")) && cp \(work.f("src")) \(mount.q("images/\(image)"))")
        try sh("truncate -s 8M \(mount.q("images/\(image)"))")
        #expect(try rbdInfo("images/\(image)").int("size") == 8 << 20)
        try sh("cp \(work.f("src")) \(work.f("expected")) && truncate -s 8M \(work.f("expected"))")
        #expect(try exportEquals("images/\(image)", work.path + "/expected"))
    }

    @Test func shrinkingAnImageThatHoldsDataIsRefusedWithEPERM() throws {
        let image = uniqueName("shrink")
        let work = try Scratch(image)
        try sh("head -c 4194304 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(image)")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        let shrink = try run("truncate -s 1M \(mount.q("images/\(image)"))")
        #expect(!shrink.succeeded)
        #expect(shrink.stderr.contains("Operation not permitted"), "\(shrink.stderr)")
        let zero = try run("truncate -s 0 \(mount.q("images/\(image)"))")
        #expect(zero.stderr.contains("Operation not permitted"), "\(zero.stderr)")
        #expect(try rbdInfo("images/\(image)").int("size") == 4 << 20)
        #expect(try exportEquals("images/\(image)", work.path + "/src"))
        #expect(try eventually(within: 3) { try logContains(mount, "would discard data") })
    }

    @Test func ddWithoutNotruncOntoAnImageWithDataIsRefused() throws {
        let image = uniqueName("ddtrunc")
        let work = try Scratch(image)
        try sh("head -c 2097152 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(image)")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        // dd opens with O_TRUNC unless conv=notrunc: that would be a shrink to 0 over data.
        let attempt = try run("head -c 4096 /dev/zero | dd of=\(mount.q("images/\(image)")) bs=4k status=none")
        #expect(!attempt.succeeded)
        #expect(attempt.stderr.contains("Operation not permitted"), "\(attempt.stderr)")
        #expect(try rbdInfo("images/\(image)").int("size") == 2 << 20)
        #expect(try exportEquals("images/\(image)", work.path + "/src"))
    }

    @Test func allowShrinkMountShrinks() throws {
        let image = uniqueName("allowshrink")
        let work = try Scratch(image)
        try sh("head -c 4194304 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(image)")
        let mount = try MountedRBDFS(["--allow-shrink"])
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        try sh("truncate -s 1M \(mount.q("images/\(image)"))")
        #expect(try rbdInfo("images/\(image)").int("size") == 1 << 20)
        try sh("head -c 1048576 \(work.f("src")) > \(work.f("expected"))")
        #expect(try exportEquals("images/\(image)", work.path + "/expected"))
    }

    @Test func anEmptyImageOrEmptyTailTruncatesFreely() throws {
        let empty = uniqueName("emptytr"), tail = uniqueName("emptytail")
        let work = try Scratch(tail)
        try sh("rbd create images/\(empty) --size 16M")
        // Data in the first object only: cutting 8..16 MiB discards nothing.
        try sh("""
            head -c 1048576 /dev/urandom > \(work.f("head")) && cp \(work.f("head")) \(work.f("src")) \
            && truncate -s 16M \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(tail)
            """)
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(empty)", "images/\(tail)"]) }
        try sh("truncate -s 4M \(mount.q("images/\(empty)"))")
        #expect(try rbdInfo("images/\(empty)").int("size") == 4 << 20)
        try sh("truncate -s 0 \(mount.q("images/\(empty)"))")
        #expect(try rbdInfo("images/\(empty)").int("size") == 0)
        try sh("truncate -s 8M \(mount.q("images/\(tail)"))")
        #expect(try rbdInfo("images/\(tail)").int("size") == 8 << 20)
        try sh("truncate -s 8M \(work.f("src"))")
        #expect(try exportEquals("images/\(tail)", work.path + "/src"))
    }

    // MARK: - 3. Glance-style upload

    @Test func cpToNameAtSnapIsAGlanceUpload() throws {
        let uuid = UUID().uuidString.lowercased()
        let work = try Scratch("glance-\(uuid.prefix(8))")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(uuid)"]) }
        try sh("head -c 3145733 /dev/urandom > \(work.f("image.raw"))")
        try sh("cp \(work.f("image.raw")) \(mount.q("images/\(uuid)@snap"))")
        let snapshots = try rbdSnapshots("images/\(uuid)")
        #expect(snapshots.map { $0["name"] as? String } == ["snap"])
        #expect(try sh("rbd info images/\(uuid)@snap").contains("protected: True"))
        #expect(try rbdInfo("images/\(uuid)").int("size") == 3_145_733)
        #expect(try exportEquals("images/\(uuid)", work.path + "/image.raw"))
        #expect(try exportEquals("images/\(uuid)@snap", work.path + "/image.raw"))
        // Through the mount: the snapshot file, read-only, with the uploaded bytes.
        try sh("cmp \(work.f("image.raw")) \(mount.q("images/\(uuid)@snap"))")
        #expect(try sh("stat -c %a \(mount.q("images/\(uuid)@snap"))").trimmed == "444")
    }

    @Test func anUploadOntoAnExistingImageIsEEXISTAndTouchesNothing() throws {
        let image = uniqueName("glancedup")
        let work = try Scratch(image)
        try sh("head -c 1048576 /dev/urandom > \(work.f("old")) && rbd import --no-progress \(work.f("old")) images/\(image)")
        try sh("head -c 2097152 /dev/urandom > \(work.f("new"))")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        let attempt = try run("cp \(work.f("new")) \(mount.q("images/\(image)@snap"))")
        #expect(!attempt.succeeded)
        #expect(attempt.stderr.contains("File exists"), "\(attempt.stderr)")
        #expect(try rbdSnapshots("images/\(image)").isEmpty)
        #expect(try rbdInfo("images/\(image)").int("size") == 1 << 20)
        #expect(try exportEquals("images/\(image)", work.path + "/old"))
    }

    // MARK: - 4. Snapshot by link

    @Test func lnImageToImageAtSnapTakesAProtectedSnapshotOfWhatWasWritten() throws {
        let image = uniqueName("lnsnap")
        let work = try Scratch(image)
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        let file = mount.path + "/images/\(image)"
        try sh("head -c 2097152 /dev/urandom > \(work.f("a")) && cp \(work.f("a")) \(mount.q("images/\(image)"))")
        try sh("head -c 1048576 /dev/urandom > \(work.f("b")) && head -c 1048576 /dev/urandom > \(work.f("c"))")
        // A writer still holds the file open: what it wrote before the ln is in the snapshot, what it
        // writes afterwards is not.
        try sh("""
            python3 - <<'PY'
            import os
            fd = os.open(\(pythonQuote(file)), os.O_RDWR)
            os.pwrite(fd, open(\(pythonQuote(work.path + "/b")), 'rb').read(), 1048576)
            os.link(\(pythonQuote(file)), \(pythonQuote(file + "@s")))
            os.pwrite(fd, open(\(pythonQuote(work.path + "/c")), 'rb').read(), 0)
            os.close(fd)
            PY
            """)
        let snapshots = try rbdSnapshots("images/\(image)")
        #expect(snapshots.map { $0["name"] as? String } == ["s"])
        #expect(snapshots.first?["protected"] as? String == "true")
        #expect(try sh("rbd info images/\(image)@s").contains("protected: True"))
        // Snapshot: a[0..1M) + b; head: c + b.
        try sh("head -c 1048576 \(work.f("a")) > \(work.f("snap")) && cat \(work.f("b")) >> \(work.f("snap"))")
        try sh("cat \(work.f("c")) \(work.f("b")) > \(work.f("head"))")
        #expect(try exportEquals("images/\(image)@s", work.path + "/snap"))
        #expect(try exportEquals("images/\(image)", work.path + "/head"))
    }

    @Test func lnOntoAnExistingSnapshotIsEEXIST() throws {
        let image = uniqueName("lnsnapdup")
        let work = try Scratch(image)
        try sh("head -c 1048576 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(image) && rbd snap create images/\(image)@s")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        let attempt = try run("ln \(mount.q("images/\(image)")) \(mount.q("images/\(image)@s"))")
        #expect(!attempt.succeeded)
        #expect(attempt.stderr.contains("File exists"), "\(attempt.stderr)")
        #expect(try rbdSnapshots("images/\(image)").count == 1)
    }

    // MARK: - 5. Clone by link

    @Test func lnSnapshotToAnotherPoolMakesAClone() throws {
        let image = uniqueName("glanceimg")
        let disk = UUID().uuidString.lowercased() + "_disk"
        let work = try Scratch(image)
        try sh("head -c 5242880 /dev/urandom > \(work.f("src"))")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["vms/\(disk)", "images/\(image)"]) }
        try sh("cp \(work.f("src")) \(mount.q("images/\(image)@snap"))")
        try sh("ln \(mount.q("images/\(image)@snap")) \(mount.q("vms/\(disk)"))")
        #expect(try sh("rbd info vms/\(disk)").contains("parent: images/\(image)@snap"))
        let parent = try rbdInfo("vms/\(disk)").dictionary("parent")
        #expect(parent?["pool"] as? String == "images")
        #expect(parent?["image"] as? String == image)
        #expect(parent?["snapshot"] as? String == "snap")
        #expect(try rbdChildren("images/\(image)@snap") == ["vms/\(disk)"])
        #expect(try exportEquals("vms/\(disk)", work.path + "/src"))
        try sh("cmp \(work.f("src")) \(mount.q("vms/\(disk)"))")
    }

    @Test func lnSnapshotIntoANamespaceOfAnotherPoolMakesAClone() throws {
        let image = uniqueName("nsparent"), namespace = uniqueName("ns")
        let disk = UUID().uuidString.lowercased() + "_disk"
        let work = try Scratch(image)
        try sh("head -c 2097152 /dev/urandom > \(work.f("src"))")
        let mount = try MountedRBDFS()
        defer {
            cleanUp(mount, images: ["volumes/\(namespace)/\(disk)", "images/\(image)"])
            _ = try? run("rbd namespace remove volumes/\(namespace)")
        }
        try sh("cp \(work.f("src")) \(mount.q("images/\(image)@snap"))")
        try sh("mkdir \(mount.q("volumes/\(namespace)"))")
        try sh("ln \(mount.q("images/\(image)@snap")) \(mount.q("volumes/\(namespace)/\(disk)"))")
        #expect(try sh("rbd info volumes/\(namespace)/\(disk)").contains("parent: images/\(image)@snap"))
        #expect(try rbdChildren("images/\(image)@snap") == ["volumes/\(namespace)/\(disk)"])
        #expect(try exportEquals("volumes/\(namespace)/\(disk)", work.path + "/src"))
    }

    // MARK: - 6. Volume clone by link

    @Test func lnVolumeToNewNameIsCindersCreateClonedVolume() throws {
        let volume = "volume-" + UUID().uuidString.lowercased(), clone = "volume-" + UUID().uuidString.lowercased()
        let work = try Scratch(String(volume.prefix(16)))
        try sh("head -c 3145728 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) volumes/\(volume)")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["volumes/\(clone)", "volumes/\(volume)"]) }
        try sh("ln \(mount.q("volumes/\(volume)")) \(mount.q("volumes/\(clone)"))")
        let snapshots = try rbdSnapshots("volumes/\(volume)")
        #expect(snapshots.map { $0["name"] as? String } == ["\(clone).clone_snap"])
        #expect(snapshots.first?["protected"] as? String == "true")
        #expect(try sh("rbd info volumes/\(clone)").contains("parent: volumes/\(volume)@\(clone).clone_snap"))
        #expect(try rbdChildren("volumes/\(volume)@\(clone).clone_snap") == ["volumes/\(clone)"])
        #expect(try exportEquals("volumes/\(clone)", work.path + "/src"))
        // The clone is its own volume: writing it leaves the source alone.
        try sh("head -c 65536 /dev/urandom | dd of=\(mount.q("volumes/\(clone)")) bs=64k conv=notrunc,fsync status=none")
        #expect(try exportEquals("volumes/\(volume)", work.path + "/src"))
    }

    // MARK: - 7. Clone depth

    @Test func theSixthCloneInAChainIsFlattenedAtTheDefaultDepthLimit() throws {
        let root = uniqueName("chain")
        let clones = (1...6).map { "\(root)-c\($0)" }
        let work = try Scratch(root)
        try sh("head -c 2097152 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(root)")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: clones.reversed().map { "images/\($0)" } + ["images/\(root)"]) }
        var parent = root
        for clone in clones {
            try sh("ln \(mount.q("images/\(parent)")) \(mount.q("images/\(parent)@s"))")
            try sh("ln \(mount.q("images/\(parent)@s")) \(mount.q("images/\(clone)"))")
            parent = clone
        }
        for (index, clone) in clones.prefix(5).enumerated() {
            let expectedParent = index == 0 ? root : clones[index - 1]
            let info = try rbdInfo("images/\(clone)")
            #expect(info.dictionary("parent")?["image"] as? String == expectedParent, "\(clone)")
            #expect(try xattr(mount, "images/\(clone)", "user.rbd.clone_depth") == "\(index + 1)")
        }
        #expect(try rbdInfo("images/\(clones[5])").dictionary("parent") == nil)
        #expect(!(try sh("rbd info images/\(clones[5])")).contains("parent:"))
        #expect(try xattr(mount, "images/\(clones[5])", "user.rbd.clone_depth") == "0")
        #expect(try exportEquals("images/\(clones[5])", work.path + "/src"))
        #expect(try rbdChildren("images/\(clones[4])@s").isEmpty)
    }

    @Test func maxCloneDepthZeroMakesEveryCloneAFullCopy() throws {
        let image = uniqueName("depth0")
        let work = try Scratch(image)
        try sh("""
            head -c 2097152 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(image) \
            && rbd snap create images/\(image)@s && rbd snap protect images/\(image)@s
            """)
        let mount = try MountedRBDFS(["--max-clone-depth", "0"])
        defer { cleanUp(mount, images: ["vms/\(image)-copy", "images/\(image)"]) }
        try sh("ln \(mount.q("images/\(image)@s")) \(mount.q("vms/\(image)-copy"))")
        #expect(try rbdInfo("vms/\(image)-copy").dictionary("parent") == nil)
        #expect(try rbdChildren("images/\(image)@s").isEmpty)
        #expect(try exportEquals("vms/\(image)-copy", work.path + "/src"))
    }

    @Test func setfattrFlattenDetachesACloneOnDemand() throws {
        let image = uniqueName("flatten")
        let work = try Scratch(image)
        try sh("""
            head -c 2097152 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(image) \
            && rbd snap create images/\(image)@s && rbd snap protect images/\(image)@s
            """)
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["vms/\(image)-clone", "images/\(image)"]) }
        try sh("ln \(mount.q("images/\(image)@s")) \(mount.q("vms/\(image)-clone"))")
        #expect(try rbdInfo("vms/\(image)-clone").dictionary("parent") != nil)
        try sh("setfattr -n user.rbd.flatten -v 1 \(mount.q("vms/\(image)-clone"))")
        #expect(try rbdInfo("vms/\(image)-clone").dictionary("parent") == nil)
        #expect(try rbdChildren("images/\(image)@s").isEmpty)
        #expect(try exportEquals("vms/\(image)-clone", work.path + "/src"))
        // A snapshot cannot be flattened.
        let onSnapshot = try run("setfattr -n user.rbd.flatten -v 1 \(mount.q("images/\(image)@s"))")
        #expect(onSnapshot.stderr.contains("Read-only file system"), "\(onSnapshot.stderr)")
    }

    // MARK: - 8. Remove

    @Test func rmRemovesAnImage() throws {
        let image = uniqueName("rm")
        try sh("rbd create images/\(image) --size 4M")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        try sh("rm \(mount.q("images/\(image)"))")
        #expect(!(try rbdList("images")).contains(image))
        #expect(try eventually(within: 3) { !(try run("test -e \(mount.q("images/\(image)"))")).succeeded })
    }

    @Test func rmOfAnImageWithSnapshotsIsENOTEMPTY() throws {
        let image = uniqueName("rmsnaps")
        let work = try Scratch(image)
        try sh("head -c 1048576 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(image) && rbd snap create images/\(image)@keep")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        let attempt = try run("rm \(mount.q("images/\(image)"))")
        #expect(!attempt.succeeded)
        #expect(attempt.stderr.contains("Directory not empty"), "\(attempt.stderr)")
        #expect(try rbdList("images").contains(image))
        #expect(try rbdSnapshots("images/\(image)").map { $0["name"] as? String } == ["keep"])
        #expect(try exportEquals("images/\(image)", work.path + "/src"))
    }

    @Test func rmOfAnImageAnotherClientHasOpenIsEBUSY() throws {
        let image = uniqueName("rmbusy")
        let work = try Scratch(image)
        try sh("head -c 1048576 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(image)")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        // `rbd watch` holds the image open (a watch on its header) until its stdin, a FIFO, is closed.
        let output = try sh("""
            mkfifo \(work.f("hold"))
            rbd watch images/\(image) < \(work.f("hold")) > /dev/null 2>&1 &
            watcher=$!
            exec 3> \(work.f("hold"))
            for i in $(seq 100); do rbd status images/\(image) | grep -q 'watcher=' && break; sleep 0.1; done
            rbd status images/\(image) | grep -q 'watcher=' || echo 'no watcher appeared'
            rm \(mount.q("images/\(image)")) 2>&1; echo "rm status $?"
            exec 3>&-
            wait $watcher
            """)
        #expect(!output.contains("no watcher appeared"), "\(output)")
        #expect(output.contains("Device or resource busy"), "\(output)")
        #expect(!output.contains("rm status 0"), "\(output)")
        #expect(try rbdList("images").contains(image))
        #expect(try exportEquals("images/\(image)", work.path + "/src"))
        // Once the other client is gone, rm works.
        try sh("rm \(mount.q("images/\(image)"))")
        #expect(!(try rbdList("images")).contains(image))
    }

    @Test func rmOfASnapshotWithClonesIsEBUSYAndWithoutRemovesIt() throws {
        let image = uniqueName("rmsnap")
        let work = try Scratch(image)
        try sh("""
            head -c 1048576 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(image) \
            && rbd snap create images/\(image)@used && rbd snap protect images/\(image)@used \
            && rbd snap create images/\(image)@free && rbd snap protect images/\(image)@free \
            && rbd clone images/\(image)@used vms/\(image)-vm
            """)
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["vms/\(image)-vm", "images/\(image)"]) }
        let attempt = try run("rm \(mount.q("images/\(image)@used"))")
        #expect(!attempt.succeeded)
        #expect(attempt.stderr.contains("Device or resource busy"), "\(attempt.stderr)")
        let used = try rbdSnapshots("images/\(image)").first { $0["name"] as? String == "used" }
        #expect(used?["protected"] as? String == "true")
        #expect(try rbdChildren("images/\(image)@used") == ["vms/\(image)-vm"])
        #expect(try exportEquals("images/\(image)@used", work.path + "/src"))
        // The protected snapshot without clones: unprotected and removed.
        try sh("rm \(mount.q("images/\(image)@free"))")
        #expect(try rbdSnapshots("images/\(image)").map { $0["name"] as? String } == ["used"])
    }

    // MARK: - 9. Rename

    @Test func mvWithinAPoolRenamesTheImage() throws {
        let from = uniqueName("mvfrom"), to = uniqueName("mvto")
        let work = try Scratch(from)
        try sh("head -c 1048576 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(from)")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(from)", "images/\(to)"]) }
        try sh("mv \(mount.q("images/\(from)")) \(mount.q("images/\(to)"))")
        let names = try rbdList("images")
        #expect(names.contains(to) && !names.contains(from), "\(names)")
        #expect(try exportEquals("images/\(to)", work.path + "/src"))
        try sh("cmp \(work.f("src")) \(mount.q("images/\(to)"))")
    }

    @Test func mvOfASnapshotRenamesTheSnapshot() throws {
        let image = uniqueName("mvsnap")
        let work = try Scratch(image)
        try sh("head -c 1048576 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(image) && rbd snap create images/\(image)@s")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        try sh("mv \(mount.q("images/\(image)@s")) \(mount.q("images/\(image)@t"))")
        #expect(try rbdSnapshots("images/\(image)").map { $0["name"] as? String } == ["t"])
        #expect(try exportEquals("images/\(image)@t", work.path + "/src"))
    }

    @Test func renameAcrossPoolsIsEXDEVAndMvFallsBackToACopy() throws {
        let image = uniqueName("mvxdev")
        let work = try Scratch(image)
        try sh("head -c 2097259 /dev/urandom > \(work.f("src")) && rbd import --no-progress \(work.f("src")) images/\(image)")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)", "volumes/\(image)"]) }
        let raw = try sh("""
            python3 - <<'PY'
            import os
            try:
                os.rename(\(pythonQuote(mount.path + "/images/\(image)")), \(pythonQuote(mount.path + "/volumes/\(image)")))
                print("renamed")
            except OSError as e:
                print("errno", e.errno)
            PY
            """)
        #expect(raw.trimmed == "errno 18", "\(raw)")
        #expect(try rbdList("images").contains(image))
        #expect(!(try rbdList("volumes")).contains(image))
        // mv gets EXDEV and copies, then removes the source.
        let mv = try run("mv \(mount.q("images/\(image)")) \(mount.q("volumes/\(image)"))")
        #expect(mv.succeeded, "\(mv.stderr)")
        // Quietly: copying the user.rbd.* attributes and the mode is skipped or accepted, not an error.
        #expect(mv.stderr.isEmpty, "\(mv.stderr)")
        #expect(try rbdList("volumes").contains(image))
        #expect(!(try rbdList("images")).contains(image))
        #expect(try rbdInfo("volumes/\(image)").int("size") == 2_097_259)
        #expect(try exportEquals("volumes/\(image)", work.path + "/src"))
    }

    @Test func renameOntoAnExistingImageIsEEXISTAndBothStay() throws {
        let a = uniqueName("mva"), b = uniqueName("mvb")
        let work = try Scratch(a)
        try sh("""
            head -c 1048576 /dev/urandom > \(work.f("a")) && rbd import --no-progress \(work.f("a")) images/\(a) \
            && head -c 1048576 /dev/urandom > \(work.f("b")) && rbd import --no-progress \(work.f("b")) images/\(b)
            """)
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(a)", "images/\(b)"]) }
        let raw = try sh("""
            python3 - <<'PY'
            import os
            try:
                os.rename(\(pythonQuote(mount.path + "/images/\(a)")), \(pythonQuote(mount.path + "/images/\(b)")))
                print("renamed")
            except OSError as e:
                print("errno", e.errno)
            PY
            """)
        #expect(raw.trimmed == "errno 17", "\(raw)")
        let mv = try run("mv \(mount.q("images/\(a)")) \(mount.q("images/\(b)"))")
        #expect(!mv.succeeded)
        #expect(mv.stderr.contains("File exists"), "\(mv.stderr)")
        #expect(try exportEquals("images/\(a)", work.path + "/a"))
        #expect(try exportEquals("images/\(b)", work.path + "/b"))
    }

    // MARK: - 10. Directories

    @Test func mkdirAtTheRootMakesAnRBDPoolAndRmdirNeedsAllowPoolDelete() throws {
        let pool = uniqueName("pool")
        defer { _ = try? run("ceph osd pool rm \(pool) \(pool) --yes-i-really-really-mean-it") }
        do {
            let mount = try MountedRBDFS()
            defer { mount.unmount() }
            try sh("mkdir \(mount.q(pool))")
            #expect(try sh("ceph osd pool application get \(pool)").contains("\"rbd\""))
            #expect(try sh("ls \(mount.q(""))").split(separator: "\n").contains(Substring(pool)))
            let refused = try run("rmdir \(mount.q(pool))")
            #expect(!refused.succeeded)
            #expect(refused.stderr.contains("Operation not permitted"), "\(refused.stderr)")
            #expect(try sh("ceph osd pool ls").split(separator: "\n").contains(Substring(pool)))
            let again = try run("mkdir \(mount.q(pool))")
            #expect(again.stderr.contains("File exists"), "\(again.stderr)")
        }
        let mount = try MountedRBDFS(["--allow-pool-delete"])
        defer { mount.unmount() }
        // A pool that holds an image is not empty.
        try sh("rbd create \(pool)/img --size 1M")
        let notEmpty = try run("rmdir \(mount.q(pool))")
        #expect(notEmpty.stderr.contains("Directory not empty"), "\(notEmpty.stderr)")
        #expect(try sh("ceph osd pool ls").split(separator: "\n").contains(Substring(pool)))
        try sh("rbd rm --no-progress \(pool)/img")
        try sh("rmdir \(mount.q(pool))")
        #expect(!(try sh("ceph osd pool ls")).split(separator: "\n").contains(Substring(pool)))
    }

    @Test func mkdirInAPoolMakesANamespaceAndRmdirRemovesItWhenEmpty() throws {
        let namespace = uniqueName("ns"), image = uniqueName("nsimg")
        let mount = try MountedRBDFS()
        defer {
            cleanUp(mount, images: ["images/\(namespace)/\(image)"])
            _ = try? run("rbd namespace remove images/\(namespace)")
        }
        try sh("mkdir \(mount.q("images/\(namespace)"))")
        #expect(try rbdNamespaces("images").contains(namespace))
        try sh("touch \(mount.q("images/\(namespace)/\(image)"))")
        #expect(try rbdList("images/\(namespace)") == [image])
        let notEmpty = try run("rmdir \(mount.q("images/\(namespace)"))")
        #expect(!notEmpty.succeeded)
        #expect(notEmpty.stderr.contains("Directory not empty"), "\(notEmpty.stderr)")
        #expect(try rbdNamespaces("images").contains(namespace))
        #expect(try rbdList("images/\(namespace)") == [image])
        try sh("rm \(mount.q("images/\(namespace)/\(image)"))")
        try sh("rmdir \(mount.q("images/\(namespace)"))")
        #expect(!(try rbdNamespaces("images")).contains(namespace))
    }

    @Test func mkdirWithTheNameOfAnImageIsEEXIST() throws {
        let image = uniqueName("clash")
        try sh("rbd create images/\(image) --size 1M")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        let attempt = try run("mkdir \(mount.q("images/\(image)"))")
        #expect(!attempt.succeeded)
        #expect(attempt.stderr.contains("File exists"), "\(attempt.stderr)")
        #expect(!(try rbdNamespaces("images")).contains(image))
        #expect(try rbdInfo("images/\(image)").int("size") == 1 << 20)
    }

    // MARK: - 11. Inspection

    @Test func aSnapshotsLinkCountIsOnePlusItsClones() throws {
        let image = uniqueName("nlink")
        try sh("rbd create images/\(image) --size 4M && rbd snap create images/\(image)@s && rbd snap protect images/\(image)@s")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)-a", "vms/\(image)-b", "images/\(image)"]) }
        #expect(try sh("stat -c %h \(mount.q("images/\(image)@s"))").trimmed == "1")
        try sh("ln \(mount.q("images/\(image)@s")) \(mount.q("images/\(image)-a"))")
        try sh("ln \(mount.q("images/\(image)@s")) \(mount.q("vms/\(image)-b"))")
        #expect(try eventually(within: 3) { try sh("stat -c %h \(mount.q("images/\(image)@s"))").trimmed == "3" })
        let row = try sh("ls -l \(mount.q("images"))").split(separator: "\n").first { $0.hasSuffix(" \(image)@s") }
        #expect(row?.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first == "3", "\(row ?? "")")
    }

    /// `ls -l` of a pool of Glance images finds its snapshot files' link counts and blocks from metadata
    /// objects rather than by opening every snapshot: each must still be what librbd says, 1 + `rbd children`
    /// and the data of `rbd diff --whole-object`, whether the clones are v1, v2, in the trash or none, and
    /// whether or not the image has an object map (which it needs to be read without opening).
    @Test func aListingShowsEachSnapshotsClonesAndBlocksAsLibrbdCountsThem() throws {
        let pool = uniqueName("glance")
        try createRBDPool(pool)
        defer { _ = try? run("ceph osd pool rm \(pool) \(pool) --yes-i-really-really-mean-it") }
        let write = "rbd bench --io-type write --io-size 1M --io-pattern seq --io-total"
        try sh("""
            set -e
            for image in alone v2 v1 trashed no-map; do
                features=""; [ $image = no-map ] && features="--image-feature layering"
                rbd create \(pool)/$image --size 16M --object-size 1M $features
            done
            \(write) 2M \(pool)/alone >/dev/null
            \(write) 1M \(pool)/no-map >/dev/null
            for image in alone v2 v1 trashed no-map; do
                rbd snap create \(pool)/$image@snap >/dev/null 2>&1 && rbd snap protect \(pool)/$image@snap
            done
            \(write) 3M \(pool)/alone >/dev/null
            rbd clone --rbd-default-clone-format 2 \(pool)/v2@snap \(pool)/v2-a
            rbd clone --rbd-default-clone-format 2 \(pool)/v2@snap \(pool)/v2-b
            rbd clone --rbd-default-clone-format 1 \(pool)/v1@snap \(pool)/v1-a
            rbd clone --rbd-default-clone-format 2 \(pool)/v1@snap \(pool)/v1-b
            rbd clone --rbd-default-clone-format 2 \(pool)/trashed@snap \(pool)/trashed-a
            rbd trash mv \(pool)/trashed-a
            rbd clone --rbd-default-clone-format 1 \(pool)/no-map@snap \(pool)/no-map-a
            """)
        let mount = try MountedRBDFS()
        defer { mount.unmount() }
        // Blocks in 512-byte units (st_blocks), then mode, links, ..., name.
        let rows = try sh("ls -ls --block-size=512 \(mount.q(pool))").split(separator: "\n")
        var shown: [String: (blocks: Int, links: Int)] = [:]
        for row in rows {
            let fields = row.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count > 3, let blocks = Int(fields[0]), let links = Int(fields[2]) else { continue }
            shown[String(fields.last!)] = (blocks, links)
        }
        for image in ["alone", "v2", "v1", "trashed", "no-map"] {
            let snapshot = "\(pool)/\(image)@snap"
            let children = try sh("rbd children \(snapshot)").split(separator: "\n").count
            let extents = try JSONSerialization.jsonObject(
                with: Data(try sh("rbd diff --whole-object --format json \(snapshot)").utf8)) as? [[String: Any]] ?? []
            let dataBytes = extents.filter { "\($0["exists"] ?? "")" == "true" }
                .reduce(0) { $0 + (($1["length"] as? Int) ?? 0) }
            #expect(shown["\(image)@snap"]?.links == 1 + children, "\(snapshot)")
            #expect(shown["\(image)@snap"]?.blocks == (dataBytes + 511) / 512, "\(snapshot)")
        }
        #expect(shown["v2@snap"]?.links == 3 && shown["v1@snap"]?.links == 3 && shown["trashed@snap"]?.links == 1)
        #expect(shown["alone@snap"]?.blocks == 2 * 2048 && shown["alone"]?.blocks == 3 * 2048,
                "objects 0 and 1 at the snapshot, 0 to 2 in the head")
        // Only the snapshot of the image without an object map was opened.
        let log = (try? String(contentsOfFile: mount.logFile, encoding: .utf8)) ?? ""
        #expect(log.contains("4 snapshots described from their metadata, opening 1: \(pool)/no-map@snap"), "\(log.suffix(2000))")
    }

    @Test func xattrsAreWhatRbdInfoSays() throws {
        let image = uniqueName("xattr")
        try sh("""
            head -c 5242880 /dev/urandom | rbd import --no-progress - images/\(image) \
            && rbd snap create images/\(image)@s && rbd snap protect images/\(image)@s
            """)
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["vms/\(image)-clone", "images/\(image)"]) }
        try sh("ln \(mount.q("images/\(image)@s")) \(mount.q("vms/\(image)-clone"))")
        let fsid = try sh("ceph fsid").trimmed
        let info = try rbdInfo("images/\(image)")
        let cloneInfo = try rbdInfo("vms/\(image)-clone")

        // The image.
        let imageFile = "images/\(image)"
        let listed = try sh("getfattr --absolute-names -d -m - \(mount.q(imageFile))")
        for name in ["id", "format", "order", "object_size", "features", "block_name_prefix", "clone_depth", "location"] {
            #expect(listed.contains("user.rbd.\(name)="), "\(name) not in \(listed)")
        }
        #expect(try xattr(mount, imageFile, "user.rbd.id") == info["id"] as? String)
        #expect(try xattr(mount, imageFile, "user.rbd.name") == "images/\(image)")
        #expect(try xattr(mount, imageFile, "user.rbd.size") == "\(info.int("size") ?? -1)")
        #expect(try xattr(mount, imageFile, "user.rbd.format") == "\(info.int("format") ?? -1)")
        #expect(try xattr(mount, imageFile, "user.rbd.order") == "\(info.int("order") ?? -1)")
        #expect(try xattr(mount, imageFile, "user.rbd.object_size") == "\(info.int("object_size") ?? -1)")
        #expect(try xattr(mount, imageFile, "user.rbd.features") == (info["features"] as? [String])?.joined(separator: ", "))
        #expect(try xattr(mount, imageFile, "user.rbd.block_name_prefix") == info["block_name_prefix"] as? String)
        #expect(try xattr(mount, imageFile, "user.rbd.clone_depth") == "0")
        #expect(try xattr(mount, imageFile, "user.rbd.location") == "rbd://\(fsid)/images/\(image)")
        #expect(try xattr(mount, imageFile, "user.rbd.parent") == nil)

        // The clone.
        let cloneFile = "vms/\(image)-clone"
        let parent = try #require(cloneInfo.dictionary("parent"))
        #expect(try xattr(mount, cloneFile, "user.rbd.id") == cloneInfo["id"] as? String)
        #expect(try xattr(mount, cloneFile, "user.rbd.block_name_prefix") == cloneInfo["block_name_prefix"] as? String)
        #expect(try xattr(mount, cloneFile, "user.rbd.parent") == "\(parent["pool"] as? String ?? "?")/\(parent["image"] as? String ?? "?")@\(parent["snapshot"] as? String ?? "?")")
        #expect(try xattr(mount, cloneFile, "user.rbd.parent") == "images/\(image)@s")
        #expect(try xattr(mount, cloneFile, "user.rbd.overlap") == "\(jsonInt(parent["overlap"]) ?? -1)")
        #expect(try xattr(mount, cloneFile, "user.rbd.clone_depth") == "1")
        let cloneListed = try sh("getfattr --absolute-names -d -m - \(mount.q(cloneFile))")
        #expect(cloneListed.contains("user.rbd.parent=") && cloneListed.contains("user.rbd.overlap="), "\(cloneListed)")

        // The snapshot.
        let snapFile = "images/\(image)@s"
        let snapshot = try #require(try rbdSnapshots("images/\(image)").first { $0["name"] as? String == "s" })
        let snapInfo = try rbdInfo("images/\(image)@s")
        let snapListed = try sh("getfattr --absolute-names -d -m - \(mount.q(snapFile))")
        for name in ["snap_id", "protected", "children", "location"] {
            #expect(snapListed.contains("user.rbd.\(name)="), "\(name) not in \(snapListed)")
        }
        #expect(try xattr(mount, snapFile, "user.rbd.snap_id") == "\(jsonInt(snapshot["id"]) ?? -1)")
        #expect(try xattr(mount, snapFile, "user.rbd.protected") == snapInfo["protected"] as? String)
        #expect(try xattr(mount, snapFile, "user.rbd.protected") == "true")
        #expect(try xattr(mount, snapFile, "user.rbd.id") == info["id"] as? String)
        let children = try rbdChildren("images/\(image)@s")
        #expect(children == ["vms/\(image)-clone"])
        #expect(try xattr(mount, snapFile, "user.rbd.children") == children.map { $0 + "\n" }.joined())
        #expect(try xattr(mount, snapFile, "user.rbd.location") == "rbd://\(fsid)/images/\(image)/s")
    }

    @Test func unknownXattrsAreENODATAAndRbdXattrsAreReadOnly() throws {
        let image = uniqueName("xattrro")
        try sh("rbd create images/\(image) --size 1M")
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(image)"]) }
        let id = try rbdInfo("images/\(image)")["id"] as? String
        let unknown = try run("getfattr -n user.rbd.nope \(mount.q("images/\(image)"))")
        #expect(!unknown.succeeded)
        #expect(unknown.stderr.contains("No such attribute"), "\(unknown.stderr)")
        let set = try run("setfattr -n user.rbd.id -v x \(mount.q("images/\(image)"))")
        #expect(!set.succeeded)
        #expect(set.stderr.contains("Operation not supported"), "\(set.stderr)")
        let remove = try run("setfattr -x user.rbd.id \(mount.q("images/\(image)"))")
        #expect(remove.stderr.contains("Operation not supported"), "\(remove.stderr)")
        #expect(try rbdInfo("images/\(image)")["id"] as? String == id)
        #expect(try xattr(mount, "images/\(image)", "user.rbd.id") == id)
    }

    // MARK: - Names RBD cannot hold

    @Test func badNamesAndSymlinksAreRefusedAndCreateNothing() throws {
        let base = uniqueName("bad")
        let long = base + String(repeating: "x", count: 96 - base.utf8.count)
        let longest = base + String(repeating: "y", count: 95 - base.utf8.count)
        let mount = try MountedRBDFS()
        defer { cleanUp(mount, images: ["images/\(longest)"]) }
        let before = try rbdList("images")
        let ats = try run("touch \(mount.q("images/\(base)@b@c"))")
        #expect(!ats.succeeded)
        #expect(ats.stderr.contains("Invalid argument"), "\(ats.stderr)")
        #expect(long.utf8.count == 96)
        let tooLong = try run("touch \(mount.q("images/\(long)"))")
        #expect(!tooLong.succeeded)
        #expect(tooLong.stderr.contains("File name too long"), "\(tooLong.stderr)")
        let symlink = try run("ln -s \(mount.q("images")) \(mount.q("images/\(base)-link"))")
        #expect(!symlink.succeeded)
        #expect(symlink.stderr.contains("Operation not permitted"), "\(symlink.stderr)")
        let after = try rbdList("images")
        #expect(after.filter { $0.hasPrefix(base) }.isEmpty, "\(after)")
        #expect(Set(after).subtracting(before).filter { $0.hasPrefix(base) }.isEmpty)
        // 95 bytes is the limit, and is fine.
        try sh("touch \(mount.q("images/\(longest)"))")
        #expect(try rbdList("images").contains(longest))
    }

    // MARK: - 12. mount-examples

    @Test func everyMountExampleRunsCleanly() throws {
        let examples = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("mount-examples").path
        let scripts = try FileManager.default.contentsOfDirectory(atPath: examples).filter { $0.hasSuffix(".sh") }.sorted()
        #expect(scripts == ["cinder-volume-clone.sh", "delete-in-use-image.sh", "glance-upload.sh", "nova-boot.sh"])
        for script in scripts {
            let mount = try MountedRBDFS()
            defer { mount.unmount() }
            let result = try run("bash \(shellQuote(examples + "/" + script)) \(shellQuote(mount.path))", timeout: 300)
            #expect(result.succeeded, "\(script) exited \(result.status):\n\(result.stdout)\n\(result.stderr)")
        }
    }
}

// MARK: - Helpers

/// A scratch directory for one test's files, removed at the end of the test.
private final class Scratch {
    let path: String

    init(_ name: String) throws {
        path = NSTemporaryDirectory() + "rbdfs-conv-" + name
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    /// `path/name`, quoted for a shell.
    func f(_ name: String) -> String { shellQuote(path + "/" + name) }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

private struct UnexpectedOutput: Error, CustomStringConvertible {
    var description: String
}

/// Unmounts (so rbdfs holds no handle), then removes each image in order with all its snapshots
/// (unprotected first). Children must come before their parents.
private func cleanUp(_ mount: MountedRBDFS, images: [String]) {
    mount.unmount()
    let purge = #"""
        purge() {
            rbd info "$1" >/dev/null 2>&1 || return 0
            for s in $(rbd snap ls --format json "$1" | python3 -c "import json,sys; [print(x['name']) for x in json.load(sys.stdin) if x.get('protected') == 'true']"); do
                rbd snap unprotect "$1@$s" >/dev/null 2>&1
            done
            rbd snap purge --no-progress "$1" >/dev/null 2>&1
            for i in 1 2 3 4 5; do rbd rm --no-progress "$1" >/dev/null 2>&1 && return 0; sleep 1; done
        }
        """#
    _ = try? run(([purge] + images.map { "purge \(shellQuote($0))" }).joined(separator: "\n"), timeout: 300)
}

/// `rbd info --format json SPEC`.
private func rbdInfo(_ spec: String) throws -> [String: Any] {
    let json = try sh("rbd info --format json \(shellQuote(spec))")
    guard let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] else {
        throw UnexpectedOutput(description: "rbd info \(spec): \(json)")
    }
    return object
}

/// `rbd snap ls --format json IMAGE`: id, name, size, protected ("true" / "false"), timestamp.
private func rbdSnapshots(_ spec: String) throws -> [[String: Any]] {
    let json = try sh("rbd snap ls --format json \(shellQuote(spec))")
    guard let list = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] else {
        throw UnexpectedOutput(description: "rbd snap ls \(spec): \(json)")
    }
    return list
}

/// `rbd children POOL/IMAGE@SNAP`, one `pool[/ns]/image` a line.
private func rbdChildren(_ spec: String) throws -> [String] {
    try sh("rbd children \(shellQuote(spec))").split(separator: "\n").map { String($0).trimmed }.filter { !$0.isEmpty }.sorted()
}

/// `rbd ls POOL[/NS]`.
private func rbdList(_ directory: String) throws -> [String] {
    try sh("rbd ls \(shellQuote(directory))").split(separator: "\n").map(String.init)
}

private func rbdNamespaces(_ pool: String) throws -> [String] {
    let json = try sh("rbd namespace ls --format json \(shellQuote(pool))")
    let list = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] ?? []
    return list.compactMap { $0["name"] as? String }
}

/// True when `rbd export SPEC` is byte-identical to the local file.
private func exportEquals(_ spec: String, _ file: String) throws -> Bool {
    let exported = file + ".export-" + UUID().uuidString.prefix(8)
    defer { unlink(exported) }
    try sh("rbd export --no-progress \(shellQuote(spec)) \(shellQuote(exported))")
    let result = try run("cmp \(shellQuote(file)) \(shellQuote(exported))")
    if !result.succeeded { print("\(spec) differs from \(file): \(result.stdout)\(result.stderr)") }
    return result.succeeded
}

/// One extended attribute's exact value through the mount; nil when getfattr finds no such attribute.
private func xattr(_ mount: MountedRBDFS, _ file: String, _ name: String) throws -> String? {
    let result = try run("getfattr --absolute-names --only-values -n \(shellQuote(name)) \(mount.q(file))")
    if !result.succeeded {
        if result.stderr.contains("No such attribute") { return nil }
        throw CommandFailed(command: "getfattr -n \(name) \(file)", result: result)
    }
    return result.stdout
}

private func logContains(_ mount: MountedRBDFS, _ text: String) throws -> Bool {
    ((try? String(contentsOfFile: mount.logFile, encoding: .utf8)) ?? "").contains(text)
}

/// A Python string literal for a path.
private func pythonQuote(_ text: String) -> String {
    "'" + text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "'", with: "\\'") + "'"
}

private func jsonInt(_ value: Any?) -> Int? {
    switch value {
    case let number as Int: return number
    case let number as NSNumber: return number.intValue
    case let text as String: return Int(text)
    default: return nil
    }
}

extension Dictionary where Key == String, Value == Any {
    fileprivate func int(_ key: String) -> Int? { jsonInt(self[key]) }
    fileprivate func dictionary(_ key: String) -> [String: Any]? { self[key] as? [String: Any] }
}
