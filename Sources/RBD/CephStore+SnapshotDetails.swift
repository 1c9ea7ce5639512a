import Foundation
internal import CRBD
import Logging
import Storage

extension CephStore {
    /// How many snapshots `describeSnapshotsByOpening` keeps open at once.
    static let snapshotOpenConcurrency = 16

    /// Reads each snapshot's clones and used bytes from RADOS objects, without opening it, as librbd finds
    /// them for a handle open at the snapshot (`rbd_list_children3`, and `rbd_diff_iterate2` over whole
    /// objects with fast-diff): one compound read of the image's header (`rbd_header.<id>`: the snapshot,
    /// its flags and its clone v2 children) and one of the snapshot's object map
    /// (`rbd_object_map.<id>.<snap id>`), many images at a time; the clone v1 children from `rbd_children`
    /// in every pool, one read per pool for the whole call; then the children's names from their pools'
    /// `rbd_directory`, or `rbd_trash` for those not there (a clone in the trash is not counted).
    ///
    /// A snapshot it cannot be sure to describe as librbd would is opened instead (`describeSnapshotsByOpening`):
    /// one removed or replaced since it was listed, an image with a feature not handled here (striping,
    /// journaling, ...), a snapshot whose used bytes only librbd's slow diff knows (no object-map or
    /// fast-diff, an invalid object map, a pending object), a child whose name is in neither its directory nor
    /// its trash or that is being removed, and any read that fails or reply that does not decode.
    public func describeSnapshots(
        _ snapshots: [SnapshotReference]
    ) -> [SnapshotReference: Result<SnapshotDetails, StorageError>] {
        guard !snapshots.isEmpty else { return [:] }
        let read = readSnapshotDetails(snapshots)
        var results = read.details.mapValues { Result<SnapshotDetails, StorageError>.success($0) }
        if !read.toOpen.isEmpty {
            let some = read.toOpen.prefix(10).map(\.description).joined(separator: ", ")
                + (read.toOpen.count > 10 ? ", ..." : "")
            logger.debug("""
                \(read.details.count) snapshots described from their metadata, opening \(read.toOpen.count): \(some)
                """)
            results.merge(describeSnapshotsByOpening(read.toOpen)) { _, opened in opened }
        }
        return results
    }

    /// `describeSnapshots` without its fallback: the snapshots it describes from metadata objects, and those
    /// it would open instead.
    func describeSnapshotsWithoutOpening(
        _ snapshots: [SnapshotReference]
    ) -> (details: [SnapshotReference: SnapshotDetails], toOpen: [SnapshotReference]) {
        readSnapshotDetails(snapshots)
    }

    private func readSnapshotDetails(
        _ snapshots: [SnapshotReference]
    ) -> (details: [SnapshotReference: SnapshotDetails], toOpen: [SnapshotReference]) {
        var seen = Set<SnapshotReference>()
        let reader = SnapshotDetailsReader(store: self, snapshots: snapshots.filter { seen.insert($0).inserted })
        reader.run()
        return (reader.details, reader.toOpen)
    }

    /// What `describeSnapshots` reports, from librbd: opens each snapshot by name (read-only, no watch),
    /// `snapshotOpenConcurrency` at a time, and asks the handle for its children and used bytes.
    func describeSnapshotsByOpening(
        _ snapshots: [SnapshotReference]
    ) -> [SnapshotReference: Result<SnapshotDetails, StorageError>] {
        let results = OpenedSnapshots()
        let group = DispatchGroup()
        let slots = DispatchSemaphore(value: Self.snapshotOpenConcurrency)
        for reference in Set(snapshots) {
            slots.wait()
            group.enter()
            DispatchQueue.global().async { [self] in
                defer {
                    slots.signal()
                    group.leave()
                }
                results.add(reference, storageResult {
                    let image = try CephImage(opening: reference.image, snapshot: reference.snapshot.name,
                                              readOnly: true, in: try ioContext(for: reference.image), logger: logger)
                    defer { image.close() }
                    return SnapshotDetails(children: try image.children(), usedBytes: try image.usedBytes())
                })
            }
        }
        group.wait()
        return results.all
    }
}

/// The results of `describeSnapshotsByOpening`, filled from several threads.
private final class OpenedSnapshots: @unchecked Sendable {
    private let lock = NSLock()
    /// Guarded by `lock`.
    private var results: [SnapshotReference: Result<SnapshotDetails, StorageError>] = [:]

    func add(_ reference: SnapshotReference, _ result: Result<SnapshotDetails, StorageError>) {
        lock.withLock { results[reference] = result }
    }

    var all: [SnapshotReference: Result<SnapshotDetails, StorageError>] { lock.withLock { results } }
}

/// One `describeSnapshots` call's reads. Everything but the librados callbacks (see `ObjectReadLoop`) runs on
/// the thread that calls `run`, so none of its state needs a lock.
private final class SnapshotDetailsReader {
    private let store: CephStore
    private let reads = ObjectReadLoop()

    /// The snapshots described, and those to open instead.
    private(set) var details: [SnapshotReference: SnapshotDetails] = [:]
    private(set) var toOpen: [SnapshotReference] = []

    /// What is known of one snapshot so far.
    private final class Snapshot {
        let reference: SnapshotReference
        var objectMap: RBDClass.ObjectMap?
        /// Its clone v1 children, from the `rbd_children` objects.
        var v1Children: [RBDClass.ChildSpec] = []
        /// Set once anything went wrong or is unknown: the snapshot is opened instead.
        var failed = false

        init(_ reference: SnapshotReference) {
            self.reference = reference
        }
    }

    /// One image and the snapshots of it asked for: its header is read once for all of them.
    private final class Image {
        let spec: ImageSpec
        let id: String
        let io: IOContext
        let snapshots: [Snapshot]
        var header: RBDClass.SnapshotDetailHeader?
        /// Reads started and not completed.
        var outstanding = 0

        init(spec: ImageSpec, id: String, io: IOContext, snapshots: [Snapshot]) {
            self.spec = spec
            self.id = id
            self.io = io
            self.snapshots = snapshots
        }
    }

    /// What a child's id stands for, as librbd resolves it.
    private enum ChildName {
        /// An image (or one in the trash being removed, which librbd counts too): its pool and name.
        case image(pool: String, name: String)
        /// In the trash: not counted.
        case trashed
        /// In neither its directory nor its trash, or not readable: librbd would fail, so the snapshot is opened.
        case unknown
    }

    private var images: [Image] = []
    /// Images whose reads have been started: those before `nextImage`.
    private var nextImage = 0
    /// Images started and not finished.
    private var reading = 0
    private var childNames: [RBDClass.ChildSpec: ChildName] = [:]

    init(store: CephStore, snapshots references: [SnapshotReference]) {
        self.store = store
        var order: [ImageKey] = []
        var byImage: [ImageKey: [Snapshot]] = [:]
        for reference in references {
            let key = ImageKey(spec: reference.image, id: reference.imageID)
            if byImage[key] == nil { order.append(key) }
            byImage[key, default: []].append(Snapshot(reference))
        }
        for key in order {
            let snapshots = byImage[key]!
            guard let io = try? store.ioContext(for: key.spec) else {
                toOpen += snapshots.map(\.reference)  // opening reports the error, as it always has
                continue
            }
            images.append(Image(spec: key.spec, id: key.id, io: io, snapshots: snapshots))
        }
    }

    private struct ImageKey: Hashable {
        var spec: ImageSpec
        var id: String
    }

    /// Reads until every snapshot is described or left to open.
    func run() {
        lookUpV1Children()
        startImageReads()
        reads.run()
        lookUpChildNames()
        reads.run()
        for image in images {
            for snapshot in image.snapshots {
                if let found = details(of: snapshot, in: image) {
                    details[snapshot.reference] = found
                } else {
                    toOpen.append(snapshot.reference)
                }
            }
        }
    }

    // MARK: Steps

    /// Clone v1 children are recorded in the `rbd_children` object of the child's pool, keyed by parent
    /// snapshot, so librbd asks every pool that is not a cache tier, in the parent's namespace. So does
    /// this, for all the snapshots at once: one read per pool (and per batch of snapshots).
    private func lookUpV1Children() {
        let allSnapshots = images.flatMap(\.snapshots)
        let pools: [(name: String, id: Int64)]
        do {
            pools = try basePools()
        } catch {
            allSnapshots.forEach { $0.failed = true }
            return
        }
        let namespaces = Set(images.map(\.spec.namespace))
        for namespace in namespaces.sorted() {
            let parents = images.filter { $0.spec.namespace == namespace }
            for pool in pools {
                let io: IOContext
                do {
                    io = try store.ioContext(pool: pool.name, namespace: namespace)
                } catch let error as StorageError where error.errno == .noSuchFileOrDirectory {
                    continue  // deleted since it was listed, as librbd skips it
                } catch {
                    parents.flatMap(\.snapshots).forEach { $0.failed = true }
                    continue
                }
                let asked = parents.flatMap { image in image.snapshots.map { (image, $0) } }
                var start = 0
                while start < asked.count {
                    let batch = Array(asked[start..<min(start + CephStore.idLookupBatch, asked.count)])
                    start += batch.count
                    let read = ObjectClassRead()
                    let calls = batch.map { image, snapshot in
                        RBDClass.addV1ChildrenLookup(read, parentPoolID: image.io.poolID, parentImageID: image.id,
                                                     snapshotID: snapshot.reference.snapshot.id)
                    }
                    reads.send(read, in: io, to: RBDClass.childrenObject) { read, code in
                        // No `rbd_children` in this pool: no clone v1 children here.
                        if code == -Int(ENOENT) { return }
                        for ((_, snapshot), call) in zip(batch, calls) {
                            guard code >= 0 else {
                                snapshot.failed = true
                                continue
                            }
                            switch read.reply(call) {
                            case .success(let reply):
                                if let ids = try? RBDClass.decodeStringSet(reply) {
                                    snapshot.v1Children += ids.map {
                                        RBDClass.ChildSpec(poolID: io.poolID, namespace: namespace, imageID: $0)
                                    }
                                } else {
                                    snapshot.failed = true
                                }
                            case .failure(let code) where code.value == -ENOENT:
                                break  // none of its clones in this pool
                            case .failure:
                                snapshot.failed = true
                            }
                        }
                    }
                }
            }
        }
    }

    /// The cluster's pools but cache tiers, as librbd visits them for clone v1 children.
    private func basePools() throws -> [(name: String, id: Int64)] {
        try store.poolIDs().filter { pool in
            var baseTier: Int64 = 0
            let code = rados_pool_get_base_tier(store.cluster, pool.id, &baseTier)
            if code == -ENOENT { return false }  // deleted since it was listed
            try check(code, "rados_pool_get_base_tier", pool.name)
            return baseTier == pool.id
        }
    }

    private func startImageReads() {
        while reading < CephStore.metadataReadConcurrency && nextImage < images.count {
            let image = images[nextImage]
            nextImage += 1
            reading += 1
            readImage(image)
        }
    }

    /// The header's part (order, features, and per snapshot its info, flags and clone v2 children) and each
    /// snapshot's object map, all sent at once.
    private func readImage(_ image: Image) {
        image.outstanding = 1
        let read = ObjectClassRead()
        let calls = RBDClass.SnapshotDetailCalls(adding: read, ids: image.snapshots.map(\.reference.snapshot.id))
        reads.send(read, in: image.io, to: RBDClass.headerObject(id: image.id)) { [self] read, code in
            // ENOENT: removed since it was listed; opening reports that as it always has.
            if code >= 0 {
                image.header = try? calls.decode(read)
            }
            partDone(image)
        }
        // An empty snapshot holds nothing: librbd does not even look.
        for snapshot in image.snapshots where snapshot.reference.snapshot.size > 0 {
            image.outstanding += 1
            let read = ObjectClassRead()
            let call = RBDClass.addObjectMapLoad(read)
            let object = RBDClass.objectMapObject(id: image.id, snapshotID: snapshot.reference.snapshot.id)
            reads.send(read, in: image.io, to: object) { [self] read, code in
                // ENOENT: no object map (the image has none, or it was removed): librbd takes its slow diff.
                if code >= 0, case .success(let reply) = read.reply(call) {
                    snapshot.objectMap = try? RBDClass.ObjectMap(decoding: reply)
                }
                partDone(image)
            }
        }
    }

    private func partDone(_ image: Image) {
        image.outstanding -= 1
        if image.outstanding == 0 {
            reading -= 1
            startImageReads()
        }
    }

    /// The name of every child found, as librbd finds it: from the child pool's directory, else from its
    /// trash (a child there is left out, unless it is being removed); one read per pool and namespace (and
    /// per batch of ids).
    private func lookUpChildNames() {
        var wanted: [PoolNamespace: Set<String>] = [:]
        for image in images {
            guard let header = image.header, header.features & RBDClass.layeringFeature != 0 else { continue }
            for snapshot in image.snapshots where !snapshot.failed {
                guard let detail = header.snapshots[snapshot.reference.snapshot.id] else { continue }
                for child in snapshot.v1Children + detail.children {
                    wanted[PoolNamespace(poolID: child.poolID, namespace: child.namespace), default: []]
                        .insert(child.imageID)
                }
            }
        }
        for (place, ids) in wanted {
            let ids = ids.sorted()
            guard let poolName = store.poolName(id: place.poolID),
                  let io = try? store.ioContext(pool: poolName, namespace: place.namespace)
            else {
                // librbd names a child in a pool that is gone with empty names: left to it.
                ids.forEach { childNames[place.child($0)] = .unknown }
                continue
            }
            var start = 0
            while start < ids.count {
                let batch = Array(ids[start..<min(start + CephStore.idLookupBatch, ids.count)])
                start += batch.count
                let read = ObjectClassRead()
                let calls = batch.map { RBDClass.addNameLookup(read, id: $0, mayFail: true) }
                reads.send(read, in: io, to: RBDClass.directoryObject) { [self] read, code in
                    var notListed: [String] = []
                    for (id, call) in zip(batch, calls) {
                        guard code >= 0 else {
                            childNames[place.child(id)] = .unknown
                            continue
                        }
                        switch read.reply(call) {
                        case .success(let reply):
                            if let name = try? RBDClass.decodeString(reply) {
                                childNames[place.child(id)] = .image(pool: poolName, name: name)
                            } else {
                                childNames[place.child(id)] = .unknown
                            }
                        case .failure(let code) where code.value == -ENOENT:
                            notListed.append(id)
                        case .failure:
                            childNames[place.child(id)] = .unknown
                        }
                    }
                    if !notListed.isEmpty {
                        lookUpTrash(notListed, of: place, poolName: poolName, in: io)
                    }
                }
            }
        }
    }

    private func lookUpTrash(_ ids: [String], of place: PoolNamespace, poolName: String, in io: IOContext) {
        let read = ObjectClassRead()
        let calls = ids.map { RBDClass.addTrashLookup(read, id: $0) }
        reads.send(read, in: io, to: RBDClass.trashObject) { [self] read, code in
            for (id, call) in zip(ids, calls) {
                guard code >= 0, case .success(let reply) = read.reply(call),
                      let entry = try? RBDClass.decodeTrashEntry(reply)
                else {
                    childNames[place.child(id)] = .unknown
                    continue
                }
                childNames[place.child(id)] = entry.source == RBDClass.trashSourceRemoving
                    ? .image(pool: poolName, name: entry.name) : .trashed
            }
        }
    }

    private struct PoolNamespace: Hashable {
        var poolID: Int64
        var namespace: String

        func child(_ imageID: String) -> RBDClass.ChildSpec {
            RBDClass.ChildSpec(poolID: poolID, namespace: namespace, imageID: imageID)
        }
    }

    // MARK: Result

    /// What librbd would report for the snapshot, or nil where this cannot be sure of it.
    private func details(of snapshot: Snapshot, in image: Image) -> SnapshotDetails? {
        let reference = snapshot.reference
        guard !snapshot.failed, let header = image.header,
              let detail = header.snapshots[reference.snapshot.id],
              detail.snapshot.name == reference.snapshot.name,
              detail.snapshot.namespaceType == RBDClass.userSnapshotNamespace,
              header.features & ~RBDClass.describableFeatures == 0
        else { return nil }

        // librbd's diff from the beginning to the snapshot, whole objects, with fast-diff: the objects its
        // object map says exist. Without a usable map it diffs object by object: left to it.
        var usedBytes: UInt64 = 0
        if detail.snapshot.size > 0 {
            guard header.features & RBDClass.objectMapFeatures == RBDClass.objectMapFeatures,
                  detail.flags & RBDClass.invalidObjectMapFlags == 0,
                  let map = snapshot.objectMap,
                  let used = map.usedBytes(size: detail.snapshot.size, objectSize: 1 << UInt64(header.order))
            else { return nil }
            usedBytes = used
        }

        // An image without layering has no clones, and librbd looks for none.
        var children: [ImageSpec] = []
        if header.features & RBDClass.layeringFeature != 0 {
            // The snapshot's own count of clone v2 children must agree with their list.
            guard detail.snapshot.childCount == detail.children.count else { return nil }
            for child in snapshot.v1Children + detail.children {
                switch childNames[child] {
                case .image(let pool, let name):
                    children.append(ImageSpec(pool: pool, namespace: child.namespace, name: name))
                case .trashed:
                    continue
                case .unknown, nil:
                    return nil
                }
            }
        }
        return SnapshotDetails(children: children.sorted(by: sortedAsLibrbdSortsChildren), usedBytes: usedBytes)
    }
}

/// librbd's order of children: by pool name, namespace, then image name, each compared byte by byte.
private func sortedAsLibrbdSortsChildren(_ a: ImageSpec, _ b: ImageSpec) -> Bool {
    for (left, right) in [(a.pool, b.pool), (a.namespace, b.namespace)] where !left.utf8.elementsEqual(right.utf8) {
        return left.utf8.lexicographicallyPrecedes(right.utf8)
    }
    return a.name.utf8.lexicographicallyPrecedes(b.name.utf8)
}
