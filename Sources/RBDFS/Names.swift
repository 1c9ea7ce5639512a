import Storage

/// The one place that knows how RBD objects are named in the tree:
///
///     MOUNT/<pool>/                  a pool (or the root itself with --pool)
///     MOUNT/<pool>/<ns>/             an RBD namespace of that pool
///     MOUNT/<pool>[/<ns>]/<image>    an image
///     MOUNT/<pool>[/<ns>]/<image>@<snap>   a user snapshot of it
public enum NodeKey: Hashable, Sendable, CustomStringConvertible {
    /// The mount's root: all pools (or, with --pool, it is that pool's directory instead).
    case root
    case pool(String)
    case namespace(pool: String, name: String)
    case image(ImageSpec)
    case snapshot(ImageSpec, name: String)

    public var isDirectory: Bool {
        switch self {
        case .root, .pool, .namespace: return true
        case .image, .snapshot: return false
        }
    }

    public var isSnapshot: Bool {
        if case .snapshot = self { return true }
        return false
    }

    /// The path inside the cluster, as the `rbd` CLI writes it (`pool/ns/image@snap`).
    public var description: String {
        switch self {
        case .root: return "/"
        case .pool(let pool): return pool
        case .namespace(let pool, let name): return "\(pool)/\(name)"
        case .image(let spec): return spec.description
        case .snapshot(let spec, let snap): return spec.describing(snapshot: snap)
        }
    }

    /// The (pool, namespace) a directory node lists images of; nil for the root of all pools.
    var imageDirectory: (pool: String, namespace: String)? {
        switch self {
        case .root, .image, .snapshot: return nil
        case .pool(let pool): return (pool, "")
        case .namespace(let pool, let name): return (pool, name)
        }
    }
}

/// A name inside a pool or namespace directory: an image or one of its snapshots.
public enum ImageFileName: Hashable, Sendable {
    case image(String)
    case snapshot(image: String, snapshot: String)

    public var imageName: String {
        switch self {
        case .image(let name), .snapshot(let name, _): return name
        }
    }

    public var fileName: String {
        switch self {
        case .image(let name): return name
        case .snapshot(let image, let snap): return "\(image)@\(snap)"
        }
    }
}

public enum NameError: Error, Hashable, Sendable {
    /// Empty, `.`/`..`, a `/`, more than one `@`, or `@` at either end.
    case invalid(String, reason: String)
    case tooLong(String, limit: Int)
}

public enum Names {
    /// librbd's limit for an image name (`RBD_MAX_IMAGE_NAME_SIZE` less its NUL); snapshot names share it.
    public static let maxImageNameBytes = 95

    /// Parses a directory entry name into an image or `image@snap`, refusing what RBD would mangle.
    public static func parseFileName(_ name: String) throws(NameError) -> ImageFileName {
        guard !name.isEmpty, name != ".", name != ".." else {
            throw .invalid(name, reason: "not an image name")
        }
        guard !name.contains("/") else { throw .invalid(name, reason: "'/' is not allowed in an RBD name") }
        let parts = name.split(separator: "@", omittingEmptySubsequences: false)
        switch parts.count {
        case 1:
            try checkLength(name)
            return .image(name)
        case 2:
            let image = String(parts[0]), snap = String(parts[1])
            guard !image.isEmpty else { throw .invalid(name, reason: "a snapshot needs an image name before '@'") }
            guard !snap.isEmpty else { throw .invalid(name, reason: "a snapshot needs a name after '@'") }
            try checkLength(image)
            try checkLength(snap)
            return .snapshot(image: image, snapshot: snap)
        default:
            throw .invalid(name, reason: "more than one '@'")
        }
    }

    /// Checks a pool or namespace directory name.
    public static func checkDirectoryName(_ name: String) throws(NameError) {
        guard !name.isEmpty, name != ".", name != "..", !name.contains("/"), !name.contains("@") else {
            throw .invalid(name, reason: "not a pool or namespace name")
        }
        try checkLength(name)
    }

    /// True when an image name can be shown as a file without ambiguity (librbd accepts names with '@'
    /// that the `rbd` CLI itself cannot address; rbdfs hides those rather than mangle them).
    public static func isRepresentable(imageName: String) -> Bool {
        !imageName.isEmpty && !imageName.contains("@") && !imageName.contains("/")
            && imageName != "." && imageName != ".."
    }

    private static func checkLength(_ part: String) throws(NameError) {
        if part.utf8.count > maxImageNameBytes { throw .tooLong(part, limit: maxImageNameBytes) }
    }
}
