/// The storage the filesystem talks to: a Ceph cluster's pools, RBD namespaces and images.
///
/// Implemented on librados/librbd (`RBD.CephStore`) and in memory (`MemoryStore`). Every failure is a
/// `StorageError` carrying the backend's errno, the call and its target; nothing is swallowed.
/// Synchronous methods may block on the network: call them from a worker thread, never from an I/O
/// completion.
public protocol BlockStore: AnyObject, Sendable {
    /// The cluster's fsid (for Glance-style `rbd://<fsid>/...` locations).
    func fsid() throws -> String

    func listPools() throws -> [PoolInfo]
    /// Creates a replicated pool, enables the `rbd` application on it and initialises it for RBD.
    func createPool(_ name: String) throws
    func deletePool(_ name: String) throws

    /// The RBD namespaces of a pool (not including the default one, "").
    func listNamespaces(pool: String) throws -> [String]
    func createNamespace(pool: String, name: String) throws
    func removeNamespace(pool: String, name: String) throws

    /// Image names in one namespace of a pool (images in the trash are not listed).
    func listImages(pool: String, namespace: String) throws -> [String]
    /// Size, times, features and user snapshots of many images at once; one failure does not fail the rest.
    /// The Ceph store opens them concurrently, which is what keeps `ls -l` of a large pool fast.
    func describeImages(pool: String, namespace: String, names: [String]) -> [String: Result<ImageSummary, StorageError>]

    /// The clones and used bytes of many snapshots at once, as a handle open at each would report them; one
    /// failure does not fail the rest. The Ceph store reads them from metadata objects rather than opening
    /// every snapshot, which is what keeps `ls -l` of a pool of Glance images (each with its snapshot) fast.
    func describeSnapshots(_ snapshots: [SnapshotReference]) -> [SnapshotReference: Result<SnapshotDetails, StorageError>]

    /// Opens an image (snapshot nil) or one of its user snapshots (always read-only).
    func openImage(_ spec: ImageSpec, snapshot: String?, readOnly: Bool) throws -> any ImageHandle
    /// Creates a format-2 image.
    func createImage(_ spec: ImageSpec, size: UInt64, options: ImageCreateOptions) throws
    /// Removes an image. ENOTEMPTY while it has snapshots (clones hang off snapshots, so that covers them), EBUSY
    /// while another client has it open (a watcher).
    func removeImage(_ spec: ImageSpec) throws
    /// Renames an image within its pool and namespace.
    func renameImage(_ spec: ImageSpec, to newName: String) throws
    /// Clones a protected snapshot (copy-on-write child, any pool of the cluster).
    func cloneImage(parent: ImageSpec, snapshot: String, child: ImageSpec, options: ImageCreateOptions) throws
    /// The clones made from one snapshot of an image.
    func children(of spec: ImageSpec, snapshot: String) throws -> [ImageSpec]

    func clusterStats() throws -> StorageStats
    func poolStats(pool: String) throws -> StorageStats
}

/// An open image (or snapshot). Handles are meant to be cached and shared by every open file of the image.
///
/// Asynchronous I/O calls `completion` exactly once, possibly on a backend thread, possibly before the call
/// returns. Completions of one image never run concurrently: keep them short and never call a synchronous
/// method of a store or handle from inside one.
public protocol ImageHandle: AnyObject, Sendable {
    var spec: ImageSpec { get }
    /// The snapshot this handle reads, or nil for the image head.
    var snapshot: String? { get }
    var isReadOnly: Bool { get }

    /// Current size and metadata (refreshed if another client changed the image).
    func info() throws -> ImageInfo
    /// Current size (refreshed if another client changed the image).
    func size() throws -> UInt64
    /// User snapshots of the image, oldest first.
    func snapshots() throws -> [SnapshotInfo]

    /// Reads up to `buffer.count` bytes at `offset`; completes with the bytes read. The buffer must stay valid
    /// until completion. I/O starting at or past the end is EINVAL: callers clamp to the size first.
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
              completion: @escaping @Sendable (Result<Int, StorageError>) -> Void)
    /// Writes `data` at `offset`. The data is copied before this returns, so the caller may reuse the buffer
    /// at once. Never grows the image: writing past the end is EINVAL.
    func write(at offset: UInt64, from data: UnsafeRawBufferPointer,
               completion: @escaping @Sendable (Result<Void, StorageError>) -> Void)
    /// Releases whole objects in the range (partial objects are left as they are).
    func discard(at offset: UInt64, length: UInt64,
                 completion: @escaping @Sendable (Result<Void, StorageError>) -> Void)
    /// Makes the range read as zeros, releasing whole objects in it (thin).
    func writeZeroes(at offset: UInt64, length: UInt64,
                     completion: @escaping @Sendable (Result<Void, StorageError>) -> Void)
    /// Completes when every write issued before it is durable in the cluster.
    func flush(completion: @escaping @Sendable (Result<Void, StorageError>) -> Void)

    /// Resizes the image; a shrink discards the data past the new end.
    func resize(to size: UInt64) throws
    /// Object-aligned extents in `range` that hold data, including data that shows through from a parent.
    func allocatedExtents(in range: Range<UInt64>) throws -> [Range<UInt64>]
    /// Bytes the image (or snapshot) really uses, as `rbd du` reports.
    func usedBytes() throws -> UInt64

    /// The clones of the snapshot this handle is open at (none for a head), as `BlockStore.children` gives them.
    func children() throws -> [ImageSpec]

    /// Whether this handle holds the image's exclusive lock now (no round trip); nil when the image has no
    /// exclusive-lock feature, so that nothing tells whether another client writes it.
    func ownsExclusiveLock() throws -> Bool?
    /// Whether another client holds the image's exclusive lock now (asks the cluster).
    func isLockedByAnotherClient() throws -> Bool

    func createSnapshot(_ name: String) throws
    func removeSnapshot(_ name: String) throws
    func renameSnapshot(_ name: String, to newName: String) throws
    func protectSnapshot(_ name: String) throws
    func unprotectSnapshot(_ name: String) throws
    /// Copies the parent's data into a clone and detaches it. `progress` gets (done, total).
    func flatten(progress: (@Sendable (UInt64, UInt64) -> Void)?) throws

    /// Calls `handler` (on a backend thread) whenever another client changes the image's header:
    /// size, snapshots, features. Returns once the watch is registered.
    func watchUpdates(_ handler: @escaping @Sendable () -> Void) throws

    /// Releases the handle (and its watches). Calls after close are a programming error.
    func close()
}
