internal import CRBD

/// A librados I/O context: one pool, one RBD namespace. Thread-safe; destroyed when its last user lets go,
/// so a cache may drop it while a call is still using it.
final class IOContext: @unchecked Sendable {
    let raw: rados_ioctx_t
    let pool: String
    let namespace: String

    init(cluster: rados_t, pool: String, namespace: String) throws {
        var io: rados_ioctx_t?
        try check(rados_ioctx_create(cluster, pool, &io), "rados_ioctx_create", pool)
        raw = io!
        self.pool = pool
        self.namespace = namespace
        rados_ioctx_set_namespace(raw, namespace)
    }

    deinit {
        rados_ioctx_destroy(raw)
    }

    /// The id of the pool this context was made for (a pool deleted and made again gets a new one).
    var poolID: Int64 { rados_ioctx_get_id(raw) }

    /// `pool` or `pool/namespace`, for errors.
    var description: String { namespace.isEmpty ? pool : "\(pool)/\(namespace)" }
}
