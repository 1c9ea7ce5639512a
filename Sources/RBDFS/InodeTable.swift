import Foundation

/// Inode numbers and kernel lookup counts, in one place (libfuse's passthrough_ll rule): every entry handed
/// to the kernel (lookup, create, readdirplus, link) counts one; `forget` takes counts away; an inode is
/// dropped when its count reaches zero. The root is never dropped.
public final class InodeTable: @unchecked Sendable {
    public static let rootInode: UInt64 = 1

    private struct Slot {
        var key: NodeKey
        var lookups: UInt64
        /// The node's name leads to another image now (see `detach`): the inode is stale.
        var detached = false
    }

    private let lock = NSLock()
    private var slots: [UInt64: Slot]
    private var inodes: [NodeKey: UInt64]
    private var nextInode: UInt64 = 2

    public init(rootKey: NodeKey) {
        slots = [Self.rootInode: Slot(key: rootKey, lookups: 1)]
        inodes = [rootKey: Self.rootInode]
    }

    /// The node an inode stands for, or nil if the kernel forgot it or it is stale.
    public func key(of inode: UInt64) -> NodeKey? {
        lock.withLock { slots[inode].flatMap { $0.detached ? nil : $0.key } }
    }

    /// The inode of a node, assigned on first use, counting one kernel lookup.
    public func remember(_ key: NodeKey) -> UInt64 {
        lock.withLock {
            if let inode = inodes[key] {
                slots[inode]!.lookups += 1
                return inode
            }
            let inode = nextInode
            nextInode += 1
            slots[inode] = Slot(key: key, lookups: 1)
            inodes[key] = inode
            return inode
        }
    }

    /// The inode a node has now, without counting a lookup (nil if the kernel holds none).
    public func existingInode(of key: NodeKey) -> UInt64? {
        lock.withLock { inodes[key] }
    }

    /// Takes `count` kernel lookups away; drops the inode at zero.
    public func forget(_ inode: UInt64, count: UInt64) {
        lock.withLock {
            guard inode != Self.rootInode, var slot = slots[inode] else { return }
            precondition(slot.lookups >= count, "kernel forgot \(count) lookups of inode \(inode) holding \(slot.lookups)")
            slot.lookups -= count
            if slot.lookups == 0 {
                slots[inode] = nil
                if inodes[slot.key] == inode { inodes[slot.key] = nil }
            } else {
                slots[inode] = slot
            }
        }
    }

    /// Points an inode at a renamed node (mv), so open files and the kernel's dentries follow it.
    public func rename(_ old: NodeKey, to new: NodeKey) {
        lock.withLock {
            guard let inode = inodes.removeValue(forKey: old) else { return }
            slots[inode]?.key = new
            inodes[new] = inode
        }
    }

    /// The nodes the kernel holds an inode for that `matches` accepts (what to invalidate when another
    /// client changed an image).
    public func inodes(where matches: (NodeKey) -> Bool) -> [(key: NodeKey, inode: UInt64)] {
        lock.withLock { inodes.filter { matches($0.key) }.map { (key: $0.key, inode: $0.value) } }
    }

    /// Makes the node's inode stale (`key(of:)` answers nil until the kernel forgets it) and frees the node
    /// for a new inode: another client replaced or removed the image under its name, so the kernel must not
    /// mix the old image's cached pages and attributes with the new one's. Returns the stale inode.
    @discardableResult
    public func detach(_ key: NodeKey) -> UInt64? {
        lock.withLock {
            guard let inode = inodes.removeValue(forKey: key) else { return nil }
            slots[inode]?.detached = true
            return inode
        }
    }

    /// Number of inodes held (for tests and metrics).
    public var count: Int { lock.withLock { slots.count } }

    public func lookupCount(of inode: UInt64) -> UInt64 { lock.withLock { slots[inode]?.lookups ?? 0 } }
}
