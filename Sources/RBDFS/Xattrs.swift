import Storage

/// Read-only `user.rbd.*` extended attributes: what `rbd info` says, for `getfattr -d -m - FILE`, and the one
/// writable attribute, `user.rbd.flatten`.
extension RBDFilesystem {
    public static let flattenAttribute = "user.rbd.flatten"

    /// Feature bit names, as `rbd info` prints them.
    static let featureNames: [(bit: UInt64, name: String)] = [
        (1 << 0, "layering"), (1 << 1, "striping"), (1 << 2, "exclusive-lock"), (1 << 3, "object-map"),
        (1 << 4, "fast-diff"), (1 << 5, "deep-flatten"), (1 << 6, "journaling"), (1 << 7, "data-pool"),
        (1 << 8, "operations"), (1 << 9, "migrating"), (1 << 10, "non-primary"),
    ]

    static func featureList(_ features: UInt64) -> String {
        featureNames.filter { features & $0.bit != 0 }.map(\.name).joined(separator: ", ")
    }

    /// Every attribute of a node, by name, with its value.
    func extendedAttributes(of inode: UInt64) throws(FSError) -> [(name: String, value: String)] {
        let key = try key(of: inode)
        let spec: ImageSpec, snapshotName: String?
        switch key {
        case .root, .pool, .namespace: return []
        case .image(let s): (spec, snapshotName) = (s, nil)
        case .snapshot(let s, let name): (spec, snapshotName) = (s, name)
        }
        if let upload = lock.withLock({ openImages[key] }), upload.isUploading { return [] }
        let summary = try summary(of: spec)
        let info = summary.info
        let fsid = try FSError.wrap { try store.fsid() }
        let location = spec.namespace.isEmpty ? "\(spec.pool)/\(spec.name)" : "\(spec.pool)/\(spec.namespace)/\(spec.name)"
        var attributes: [(String, String)] = [
            // What the file is in RBD, as the rbd CLI names it: `rbdfs info` starts from this.
            ("user.rbd.name", spec.describing(snapshot: snapshotName)),
            ("user.rbd.size", "\(try attributes(of: key, inode: inode).size)"),
            ("user.rbd.id", info.id),
            ("user.rbd.format", "\(info.format)"),
            ("user.rbd.order", "\(info.order)"),
            ("user.rbd.object_size", "\(info.objectSize)"),
            ("user.rbd.features", Self.featureList(info.features)),
            ("user.rbd.block_name_prefix", info.blockNamePrefix),
            ("user.rbd.clone_depth", "\(try cloneDepth(of: spec))"),
        ]
        if let parent = info.parent {
            attributes.append(("user.rbd.parent", parent.image.describing(snapshot: parent.snapshot)))
            attributes.append(("user.rbd.overlap", "\(parent.overlap)"))
        }
        if let snapshotName {
            guard let snapshot = summary.snapshots.first(where: { $0.name == snapshotName }) else {
                throw .notFound(key.description)
            }
            attributes.append(("user.rbd.snap_id", "\(snapshot.id)"))
            attributes.append(("user.rbd.protected", snapshot.isProtected ? "true" : "false"))
            let children = try children(of: spec, snapshot: snapshotName)
            attributes.append(("user.rbd.children", children.map { "\($0)\n" }.joined()))
            // Glance's direct_url for an image stored as image + snapshot.
            attributes.append(("user.rbd.location", "rbd://\(fsid)/\(location)/\(snapshotName)"))
        } else {
            attributes.append(("user.rbd.location", "rbd://\(fsid)/\(location)"))
        }
        return attributes
    }

    public func listExtendedAttributes(_ inode: UInt64) throws(FSError) -> [String] {
        try extendedAttributes(of: inode).map(\.name)
    }

    public func extendedAttribute(_ inode: UInt64, name: String) throws(FSError) -> [UInt8] {
        guard name.hasPrefix("user.rbd.") else { throw .noAttribute(name) }
        guard let attribute = try extendedAttributes(of: inode).first(where: { $0.name == name }) else {
            throw .noAttribute(name)
        }
        return Array(attribute.value.utf8)
    }

    /// `setfattr -n user.rbd.flatten -v 1 FILE` flattens a clone; every other attribute is read-only
    /// (setting one to the value it has is accepted).
    public func setExtendedAttribute(_ inode: UInt64, name: String, value: [UInt8]) throws(FSError) {
        let key = try key(of: inode)
        guard name == Self.flattenAttribute else {
            if name.hasPrefix("user.rbd.") {
                // Copying a file's attributes onto itself (mv across pools, cp -a) sets what is already there.
                if let current = try extendedAttributes(of: inode).first(where: { $0.name == name }), Array(current.value.utf8) == value {
                    return
                }
                // ENOTSUP, not EPERM: cp -a and mv across pools skip unsupported attributes silently.
                throw .notSupported(key.description, reason: "\(name) is read-only")
            }
            throw .notSupported(key.description, reason: "only user.rbd.* attributes exist")
        }
        try checkMountWritable(key.description)
        guard case .image(let spec) = key else {
            throw .readOnly(key.description, reason: "only an image (not a snapshot) can be flattened")
        }
        try flatten(spec)
    }

    public func removeExtendedAttribute(_ inode: UInt64, name: String) throws(FSError) {
        let key = try key(of: inode)
        if name.hasPrefix("user.rbd.") { throw .notSupported(key.description, reason: "\(name) is read-only") }
        throw .noAttribute(name)
    }
}
