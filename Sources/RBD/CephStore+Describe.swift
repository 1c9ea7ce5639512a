import Foundation
internal import CRBD
import Storage

extension CephStore {
    /// How many images `describeImages` keeps opening at once.
    static let describeConcurrency = 64

    /// Opens the images read-only and without a watch (`rbd_aio_open_read_only`), up to
    /// `describeConcurrency` at a time, reads each one's metadata on this thread as soon as it is open
    /// (no round trip: librbd loaded it at open), and closes it with `rbd_aio_close`. `rbd ls -l` does the
    /// same one image at a time.
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
