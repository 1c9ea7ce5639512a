import Foundation
internal import CRBD
import Logging
import Storage

extension CephStore {
    /// How many images `describeImagesByOpening` keeps opening at once.
    static let describeConcurrency = 64
    /// How many images `describeImages` reads the metadata objects of at once.
    static let metadataReadConcurrency = 128
    /// How many names one read of `rbd_directory` looks up.
    static let idLookupBatch = 256

    /// Reads each image's metadata straight from its RADOS objects, without opening it: ids from
    /// `rbd_directory`, then one read of the header object (`rbd_header.<id>`) through the `rbd` object
    /// class, then at once its snapshots, its object map (for `usedBytes`) and its parent's names. Many
    /// images are read at a time, all from this thread: a few librados operations an image instead of
    /// librbd's open, which costs milliseconds of CPU. What this reads is what librbd would report.
    ///
    /// An image it cannot be sure to describe as librbd would is opened instead (`describeImagesByOpening`):
    /// one that is not there (the error is librbd's), a format-1 image, one with a feature not handled here
    /// (striping, journaling, migration, a non-primary mirror, a dirty cache), one whose used bytes only
    /// librbd's slow diff knows (no fast-diff, an invalid object map, a pending object), a clone whose head
    /// no longer maps its parent or whose parent is in the trash, and any reply that does not decode.
    public func describeImages(
        pool: String, namespace: String, names: [String]
    ) -> [String: Result<ImageSummary, StorageError>] {
        guard !names.isEmpty else { return [:] }
        let io: IOContext
        switch storageResult({ try ioContext(pool: pool, namespace: namespace) }) {
        case .success(let context):
            io = context
        case .failure(let error):
            return Dictionary(names.map { ($0, .failure(error)) }, uniquingKeysWith: { first, _ in first })
        }
        let read = readMetadata(of: names, in: io)
        var results = read.summaries.mapValues { Result<ImageSummary, StorageError>.success($0) }
        if !read.toOpen.isEmpty {
            let some = read.toOpen.prefix(10).joined(separator: ", ") + (read.toOpen.count > 10 ? ", ..." : "")
            logger.debug("""
                \(io.description): \(read.summaries.count) images described from their metadata, \
                opening \(read.toOpen.count): \(some)
                """)
            results.merge(describeImages(opening: read.toOpen, in: io)) { _, opened in opened }
        }
        return results
    }

    /// `describeImages` without its fallback: the images it describes from their metadata objects, and
    /// the names it would open instead.
    func describeImagesWithoutOpening(
        pool: String, namespace: String, names: [String]
    ) throws -> (summaries: [String: ImageSummary], toOpen: [String]) {
        readMetadata(of: names, in: try ioContext(pool: pool, namespace: namespace))
    }

    private func readMetadata(
        of names: [String], in io: IOContext
    ) -> (summaries: [String: ImageSummary], toOpen: [String]) {
        var seen = Set<String>()
        let reader = MetadataReader(store: self, io: io, names: names.filter { seen.insert($0).inserted })
        reader.run()
        return (reader.summaries, reader.toOpen)
    }

    /// What `describeImages` reports, from librbd's image handles: opens the images read-only and without a
    /// watch (`rbd_aio_open_read_only`), up to `describeConcurrency` at a time, reads each one's metadata
    /// on this thread as soon as it is open (no round trip: librbd loaded it at open), and closes it with
    /// `rbd_aio_close`. `rbd ls -l` does the same one image at a time.
    func describeImagesByOpening(
        pool: String, namespace: String, names: [String]
    ) -> [String: Result<ImageSummary, StorageError>] {
        guard !names.isEmpty else { return [:] }
        switch storageResult({ try ioContext(pool: pool, namespace: namespace) }) {
        case .success(let io):
            return describeImages(opening: names, in: io)
        case .failure(let error):
            return Dictionary(names.map { ($0, .failure(error)) }, uniquingKeysWith: { first, _ in first })
        }
    }

    private func describeImages(
        opening names: [String], in io: IOContext
    ) -> [String: Result<ImageSummary, StorageError>] {
        let pool = io.pool
        let namespace = io.namespace
        let events = DescribeEvents()
        // librbd writes each image handle here when its open starts and reads it when it ends.
        let handles = UnsafeMutableBufferPointer<rbd_image_t?>.allocate(capacity: names.count)
        handles.initialize(repeating: nil)
        defer { handles.deallocate() }

        var results: [String: Result<ImageSummary, StorageError>] = [:]
        var started = 0
        var opening = 0
        while started < names.count || opening > 0 {
            while started < names.count && opening < Self.describeConcurrency {
                let index = started
                startAsync({ rbd_aio_open_read_only(io.raw, names[index], handles.baseAddress! + index, nil, $0) }) {
                    events.opened(index, code: $0)
                }
                started += 1
                opening += 1
            }
            for (index, code) in events.waitForOpened() {
                opening -= 1
                let spec = ImageSpec(pool: pool, namespace: namespace, name: names[index])
                guard code >= 0, let handle = handles[index] else {
                    results[spec.name] = .failure(
                        StorageError(code: code, operation: "rbd_aio_open_read_only", target: spec.description))
                    continue
                }
                let image = RawImage(raw: handle, spec: spec, snapshot: nil)
                results[spec.name] = storageResult {
                    let info = try image.info()
                    // One object-map read with fast-diff: what `du` and `ls -s` show.
                    return ImageSummary(info: info, snapshots: try image.userSnapshots(),
                                        usedBytes: try? image.usedBytes(size: info.size))
                }
                events.closeStarted()
                // A read-only image has nothing to flush: a failed close loses nothing worth reporting.
                startAsync({ rbd_aio_close(handle, $0) }) { _ in events.closeEnded() }
            }
        }
        events.waitForCloses()
        return results
    }
}

/// Where librbd's completions for one `describeImages` call meet the thread that runs it.
private final class DescribeEvents: @unchecked Sendable {
    private let condition = NSCondition()
    /// Guarded by `condition`.
    private var openedImages: [(index: Int, code: Int)] = []
    /// Guarded by `condition`.
    private var closing = 0

    func opened(_ index: Int, code: Int) {
        condition.withLock {
            openedImages.append((index, code))
            condition.signal()
        }
    }

    /// Waits for at least one open to end, and takes every one that has.
    func waitForOpened() -> [(index: Int, code: Int)] {
        condition.withLock {
            while openedImages.isEmpty { condition.wait() }
            defer { openedImages = [] }
            return openedImages
        }
    }

    func closeStarted() {
        condition.withLock { closing += 1 }
    }

    func closeEnded() {
        condition.withLock {
            closing -= 1
            condition.signal()
        }
    }

    func waitForCloses() {
        condition.withLock {
            while closing > 0 { condition.wait() }
        }
    }
}

/// One `describeImages` call's reads of image metadata objects. Everything but the librados callbacks
/// (see `ObjectReadLoop`) runs on the thread that calls `run`, so none of its state needs a lock.
private final class MetadataReader {
    private let store: CephStore
    private let io: IOContext
    private let names: [String]

    /// The images read, by name.
    private(set) var summaries: [String: ImageSummary] = [:]
    /// The images to open instead.
    private(set) var toOpen: [String] = []

    private let reads = ObjectReadLoop()
    /// Images whose id is known, in the order found; those before `nextToRead` have been started.
    private var found: [Image] = []
    private var nextToRead = 0
    /// Images started and not finished.
    private var reading = 0
    /// Pool names by id, nil for a pool that is gone.
    private var poolNames: [Int64: String?] = [:]

    /// What is known of one image so far.
    private final class Image {
        let name: String
        let id: String
        var header: RBDClass.Header?
        var snapshots: [SnapshotInfo] = []
        var usedBytes: UInt64?
        var parentImage: ImageSpec?
        var parentSnapshot: String?
        /// Reads started after the header's and not yet completed.
        var outstanding = 0
        /// Set once anything went wrong or is unknown: the image is opened instead.
        var failed = false

        init(name: String, id: String) {
            self.name = name
            self.id = id
        }
    }

    init(store: CephStore, io: IOContext, names: [String]) {
        self.store = store
        self.io = io
        self.names = names
    }

    /// Reads until every image is described or left to open.
    func run() {
        lookUpIDs()
        reads.run()
    }

    /// Sends `read`; `handle` runs on this thread once it completes.
    private func send(
        _ read: ObjectClassRead, in io: IOContext, to object: String,
        then handle: @escaping (ObjectClassRead, Int) -> Void
    ) {
        reads.send(read, in: io, to: object, then: handle)
    }

    // MARK: Steps

    /// Ids by name from `rbd_directory`, a batch of names a read.
    private func lookUpIDs() {
        var start = 0
        while start < names.count {
            let batch = Array(names[start..<min(start + CephStore.idLookupBatch, names.count)])
            start += batch.count
            let read = ObjectClassRead()
            let calls = batch.map { RBDClass.addIDLookup(read, name: $0) }
            send(read, in: io, to: RBDClass.directoryObject) { [self] read, code in
                for (name, call) in zip(batch, calls) {
                    // Not found: no such image, or a format-1 one. Opening tells which, and fails as it always has.
                    guard code >= 0, case .success(let reply) = read.reply(call),
                          let id = try? RBDClass.decodeString(reply), !id.isEmpty
                    else {
                        toOpen.append(name)
                        continue
                    }
                    found.append(Image(name: name, id: id))
                }
                startReads()
            }
        }
    }

    private func startReads() {
        while reading < CephStore.metadataReadConcurrency && nextToRead < found.count {
            let image = found[nextToRead]
            nextToRead += 1
            reading += 1
            readHeader(image)
        }
    }

    /// Size, features, flags, snapshot ids, object prefix, timestamps and parent link: one read.
    private func readHeader(_ image: Image) {
        let read = ObjectClassRead()
        let calls = RBDClass.HeaderCalls(adding: read)
        send(read, in: io, to: RBDClass.headerObject(id: image.id)) { [self] read, code in
            // ENOENT: removed since it was listed; opening reports that as it always has.
            guard code >= 0, let header = try? calls.decode(read) else { return giveUp(image) }
            readDetails(image, header)
        }
    }

    /// Snapshots, object map and parent names, read at once; or the decision to open the image.
    private func readDetails(_ image: Image, _ header: RBDClass.Header) {
        image.header = header
        guard header.features & ~RBDClass.describableFeatures == 0 else { return giveUp(image) }

        // librbd's used bytes: nothing for an empty image (it is not even asked), else fast-diff from the
        // object maps when every one involved is valid; anything else takes its slow diff, left to it.
        let readsObjectMap = header.size > 0
        if readsObjectMap {
            guard header.features & RBDClass.objectMapFeatures == RBDClass.objectMapFeatures,
                  header.flags & RBDClass.invalidObjectMapFlags == 0
            else { return giveUp(image) }
        } else {
            image.usedBytes = 0
        }

        // A clone's parent is reported while the head maps some of it (librbd opens it only then).
        var parentIO: IOContext?
        if let parent = header.parent {
            guard let overlap = header.parentOverlap, overlap > 0,
                  let poolName = poolName(parent.poolID),
                  let context = try? store.ioContext(pool: poolName, namespace: parent.namespace)
            else { return giveUp(image) }
            parentIO = context
        } else if header.parentOverlap != nil {
            return giveUp(image)
        }

        if readsObjectMap {
            readObjectMap(image, header)
        }
        if !header.snapshotIDs.isEmpty {
            readSnapshots(image, header, checkingObjectMaps: readsObjectMap)
        }
        if let parent = header.parent, let parentIO {
            readParentNames(image, parent, in: parentIO)
        }
        if image.outstanding == 0 {
            finish(image)
        }
    }

    private func readObjectMap(_ image: Image, _ header: RBDClass.Header) {
        image.outstanding += 1
        let read = ObjectClassRead()
        let call = RBDClass.addObjectMapLoad(read)
        send(read, in: io, to: RBDClass.objectMapObject(id: image.id)) { [self] read, code in
            if code >= 0, case .success(let reply) = read.reply(call),
               let map = try? RBDClass.ObjectMap(decoding: reply),
               let used = map.usedBytes(size: header.size, objectSize: 1 << UInt64(header.order)) {
                image.usedBytes = used
            } else {
                image.failed = true
            }
            partDone(image)
        }
    }

    /// Every snapshot (user ones are kept), and with them whether their object maps are valid: librbd's
    /// diff from the image's beginning reads each snapshot's map, and takes its slow path if one is not.
    private func readSnapshots(_ image: Image, _ header: RBDClass.Header, checkingObjectMaps: Bool) {
        image.outstanding += 1
        let read = ObjectClassRead()
        let calls = RBDClass.SnapshotCalls(adding: read, ids: header.snapshotIDs)
        send(read, in: io, to: RBDClass.headerObject(id: image.id)) { [self] read, code in
            // ENOENT for one: removed since the header was read; librbd would read it all again.
            if code >= 0, let snapshots = try? calls.decode(read),
               !(checkingObjectMaps && snapshots.contains { $0.flags & RBDClass.invalidObjectMapFlags != 0 }) {
                image.snapshots = snapshots
                    .filter { $0.namespaceType == RBDClass.userSnapshotNamespace }
                    .map {
                        SnapshotInfo(id: $0.id, name: $0.name, size: $0.size, timestamp: $0.timestamp,
                                     isProtected: $0.protectionStatus == RBDClass.protectedStatus)
                    }
                    .sorted { $0.id < $1.id }
            } else {
                image.failed = true
            }
            partDone(image)
        }
    }

    /// The parent image's name (from its directory) and its snapshot's (from its header).
    private func readParentNames(_ image: Image, _ parent: RBDClass.ParentSpec, in parentIO: IOContext) {
        image.outstanding += 2
        let names = ObjectClassRead()
        let nameCall = RBDClass.addNameLookup(names, id: parent.imageID)
        send(names, in: parentIO, to: RBDClass.directoryObject) { [self] read, code in
            // Not found: the parent is in the trash, where librbd finds its name.
            if code >= 0, case .success(let reply) = read.reply(nameCall),
               let name = try? RBDClass.decodeString(reply) {
                image.parentImage = ImageSpec(pool: parentIO.pool, namespace: parentIO.namespace, name: name)
            } else {
                image.failed = true
            }
            partDone(image)
        }
        let snapshot = ObjectClassRead()
        let snapshotCall = RBDClass.addSnapshotNameLookup(snapshot, id: parent.snapshotID)
        send(snapshot, in: parentIO, to: RBDClass.headerObject(id: parent.imageID)) { [self] read, code in
            if code >= 0, let name = try? RBDClass.decodeSnapshotName(read, snapshotCall, id: parent.snapshotID) {
                image.parentSnapshot = name
            } else {
                image.failed = true
            }
            partDone(image)
        }
    }

    private func partDone(_ image: Image) {
        image.outstanding -= 1
        if image.outstanding == 0 {
            finish(image)
        }
    }

    private func giveUp(_ image: Image) {
        image.failed = true
        finish(image)
    }

    private func finish(_ image: Image) {
        reading -= 1
        if !image.failed, let summary = summary(of: image) {
            summaries[image.name] = summary
        } else {
            toOpen.append(image.name)
        }
        startReads()
    }

    private func summary(of image: Image) -> ImageSummary? {
        guard let header = image.header, let usedBytes = image.usedBytes else { return nil }
        var parent: ParentInfo?
        if header.parent != nil {
            guard let parentImage = image.parentImage, let parentSnapshot = image.parentSnapshot,
                  let overlap = header.parentOverlap
            else { return nil }
            parent = ParentInfo(image: parentImage, snapshot: parentSnapshot, overlap: overlap)
        }
        let info = ImageInfo(
            id: image.id, size: header.size, objectSize: 1 << UInt64(header.order), order: header.order,
            features: header.features, flags: header.flags, format: 2, blockNamePrefix: header.objectPrefix,
            createTime: header.createTime, modifyTime: header.modifyTime, accessTime: header.accessTime,
            parent: parent)
        return ImageSummary(info: info, snapshots: image.snapshots, usedBytes: usedBytes)
    }

    private func poolName(_ id: Int64) -> String? {
        if let known = poolNames[id] { return known }
        let name = store.poolName(id: id)
        poolNames[id] = .some(name)
        return name
    }
}
