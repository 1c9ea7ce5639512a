import Foundation
import Storage

/// Short-lived copies of what listings fetched (pools, namespaces, image summaries), so that the `getattr`
/// and `lookup` calls that follow a `readdir` do not reopen every image. Entries live `ttl` seconds: the same
/// bound as the kernel's attribute timeout, which is what keeps changes made by other clients visible
/// within about a second.
final class MetadataCache: @unchecked Sendable {
    private struct Stamped<Value> {
        var value: Value
        var fetched: ContinuousClock.Instant
    }

    private let ttl: Duration
    private let lock = NSLock()
    private var summaries: [ImageSpec: Stamped<ImageSummary>] = [:]
    private var namespaceLists: [String: Stamped<[String]>] = [:]
    private var poolList: Stamped<[PoolInfo]>?
    private var childLists: [NodeKey: Stamped<[ImageSpec]>] = [:]
    private var snapshotUse: [NodeKey: Stamped<UInt64>] = [:]

    init(ttl: Duration) { self.ttl = ttl }

    private func fresh<V>(_ entry: Stamped<V>?) -> V? {
        guard let entry, ContinuousClock.now - entry.fetched < ttl else { return nil }
        return entry.value
    }

    func summary(_ spec: ImageSpec) -> ImageSummary? { lock.withLock { fresh(summaries[spec]) } }

    func store(_ summary: ImageSummary, for spec: ImageSpec) {
        lock.withLock { summaries[spec] = Stamped(value: summary, fetched: .now) }
    }

    func forget(_ spec: ImageSpec) { lock.withLock { summaries[spec] = nil } }

    func namespaces(of pool: String) -> [String]? { lock.withLock { fresh(namespaceLists[pool]) } }

    func store(namespaces list: [String], of pool: String) {
        lock.withLock { namespaceLists[pool] = Stamped(value: list, fetched: .now) }
    }

    func forgetNamespaces(of pool: String) { lock.withLock { namespaceLists[pool] = nil } }

    func children(of snapshot: NodeKey) -> [ImageSpec]? { lock.withLock { fresh(childLists[snapshot]) } }

    func store(children: [ImageSpec], of snapshot: NodeKey) {
        lock.withLock { childLists[snapshot] = Stamped(value: children, fetched: .now) }
    }

    func usedBytes(of snapshot: NodeKey) -> UInt64? { lock.withLock { fresh(snapshotUse[snapshot]) } }

    func store(usedBytes: UInt64, of snapshot: NodeKey) {
        lock.withLock { snapshotUse[snapshot] = Stamped(value: usedBytes, fetched: .now) }
    }

    /// Forgets an image's summary and the clone lists of its snapshots.
    func forgetImage(_ spec: ImageSpec) {
        lock.withLock {
            summaries[spec] = nil
            childLists = childLists.filter { key, _ in
                if case .snapshot(let owner, _) = key { return owner != spec }
                return true
            }
        }
    }

    func pools() -> [PoolInfo]? { lock.withLock { fresh(poolList) } }

    func store(pools list: [PoolInfo]) { lock.withLock { poolList = Stamped(value: list, fetched: .now) } }

    func forgetPools() { lock.withLock { poolList = nil } }

    /// Drops summaries older than the ttl, so a long-running mount does not keep every image it ever listed.
    func prune() {
        lock.withLock {
            let now = ContinuousClock.now
            summaries = summaries.filter { now - $0.value.fetched < ttl }
            childLists = childLists.filter { now - $0.value.fetched < ttl }
            snapshotUse = snapshotUse.filter { now - $0.value.fetched < ttl }
        }
    }
}
