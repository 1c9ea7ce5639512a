import Storage

/// What `stat` shows of a node; the FUSE adapter turns it into a `struct stat`.
public struct FileAttributes: Hashable, Sendable {
    public enum Kind: Sendable { case directory, regularFile }

    public var inode: UInt64
    public var kind: Kind
    /// Permission bits only (0o644, 0o444, 0o755).
    public var permissions: UInt16
    public var linkCount: UInt32
    public var size: UInt64
    /// 512-byte blocks really used.
    public var blocks: UInt64
    /// The preferred I/O size: the image's object size.
    public var blockSize: UInt32
    public var accessTime: Timestamp
    public var modifyTime: Timestamp
    public var changeTime: Timestamp
    public var uid: UInt32
    public var gid: UInt32
}

/// A name handed to the kernel with its attributes (lookup, create, readdirplus). Each counts one lookup.
public struct Entry: Sendable {
    public var inode: UInt64
    public var attributes: FileAttributes
}

/// One name in a directory listing.
public struct DirectoryItem: Sendable {
    public var name: String
    public var key: NodeKey
    public var kind: FileAttributes.Kind
}
