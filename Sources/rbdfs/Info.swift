import ArgumentParser
import FUSE
import Foundation

/// `rbdfs info PATH`: what `rbd info` says of a file in the mount, plus its clone family — the parent chain
/// up to the root image and the clones of every snapshot, as a tree. It reads only the mount (the
/// `user.rbd.*` attributes and directory listings), so it needs no cluster credentials of its own.
struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show an image or snapshot in an rbdfs mount: rbd info, its parents and its clones.")

    @Argument(help: "An image or IMAGE@SNAP file in an rbdfs mount.")
    var path: String

    @Flag(help: "Print JSON for scripts.")
    var json = false

    func run() throws {
        let mount = try MountView(containing: path)
        let file = try mount.describe(path: URL(fileURLWithPath: path).standardizedFileURL.path)
        var chain: [ImageFile] = [file]
        while let parent = chain.last?.parent, chain.count < 64, let parentFile = try? mount.describe(name: parent) {
            chain.append(parentFile)
        }
        let root = chain.last!.imageName
        let family = try mount.family(of: root)
        if json {
            let object: [String: Any] = [
                "file": file.json, "parents": chain.dropFirst().map(\.name), "family": family.json,
            ]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(file.report)
            print("clone family (from the root image; * marks this file):")
            family.treeLines(marking: file.imageName, snapshot: file.snapshotName).forEach { print($0) }
        }
    }
}

/// One image or snapshot as its attributes describe it.
struct ImageFile {
    var name: String
    var attributes: [String: String]

    var imageName: String { name.split(separator: "@", maxSplits: 1).first.map(String.init) ?? name }
    var snapshotName: String? { name.contains("@") ? String(name.split(separator: "@", maxSplits: 1)[1]) : nil }
    var parent: String? { attributes["parent"] }
    var children: [String] { (attributes["children"] ?? "").split(separator: "\n").map(String.init) }

    var json: [String: Any] {
        var object: [String: Any] = ["name": name]
        for (key, value) in attributes where key != "children" {
            object[key] = UInt64(value).map { $0 as Any } ?? value
        }
        if snapshotName != nil { object["children"] = children }
        return object
    }

    var report: String {
        let size = UInt64(attributes["size"] ?? "") ?? 0
        let objectSize = UInt64(attributes["object_size"] ?? "") ?? 1
        var lines = [
            "rbd image '\(name)':",
            "\tsize \(Self.bytes(size)) in \((size + objectSize - 1) / objectSize) objects",
            "\torder \(attributes["order"] ?? "?") (\(Self.bytes(objectSize)) objects)",
            "\tid: \(attributes["id"] ?? "?")",
            "\tblock_name_prefix: \(attributes["block_name_prefix"] ?? "?")",
            "\tformat: \(attributes["format"] ?? "?")",
            "\tfeatures: \(attributes["features"] ?? "")",
        ]
        if let parent {
            lines.append("\tparent: \(parent)")
            lines.append("\toverlap: \(Self.bytes(UInt64(attributes["overlap"] ?? "") ?? 0))")
        }
        lines.append("\tclone depth: \(attributes["clone_depth"] ?? "0")")
        if snapshotName != nil {
            lines.append("\tprotected: \(attributes["protected"] == "true" ? "True" : "False")")
            lines.append("\tchildren: \(children.isEmpty ? "none" : children.joined(separator: ", "))")
        }
        if let location = attributes["location"] { lines.append("\tlocation: \(location)") }
        return lines.joined(separator: "\n")
    }

    static func bytes(_ count: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var value = Double(count), unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(count) B" : String(format: value.rounded() == value ? "%.0f %@" : "%.1f %@", value, units[unit])
    }
}

/// An image, its snapshots and, under each, the clones made from it.
struct FamilyNode {
    var image: String
    var snapshots: [(name: String, clones: [FamilyNode])]

    var json: [String: Any] {
        ["image": image, "snapshots": snapshots.map { ["name": $0.name, "clones": $0.clones.map(\.json)] as [String: Any] }]
    }

    /// The tree as text lines; `*` marks the file asked about.
    func treeLines(marking image: String, snapshot: String?) -> [String] {
        var lines = ["\(self.image)\(self.image == image && snapshot == nil ? " *" : "")"]
        for (index, snap) in snapshots.enumerated() {
            let last = index == snapshots.count - 1
            lines.append("\(last ? "└─" : "├─") @\(snap.name)\(self.image == image && snapshot == snap.name ? " *" : "")")
            let pad = last ? "   " : "│  "
            for (cloneIndex, clone) in snap.clones.enumerated() {
                let lastClone = cloneIndex == snap.clones.count - 1
                let sub = clone.treeLines(marking: image, snapshot: snapshot)
                lines.append(pad + (lastClone ? "└─ " : "├─ ") + sub[0])
                lines += sub.dropFirst().map { pad + (lastClone ? "   " : "│  ") + $0 }
            }
        }
        return lines
    }
}

/// An rbdfs mount seen from outside: RBD names (`pool/ns/image@snap`) to paths, and attributes.
struct MountView {
    /// The mount's root directory.
    var root: String
    /// The pool the root shows, when mounted with --pool; nil when the root lists pools.
    var rootPool: String?

    init(containing path: String) throws {
        let absolute = URL(fileURLWithPath: path).standardizedFileURL.path
        guard let name = Self.attribute("user.rbd.name", of: absolute) else {
            throw ValidationError("\(path) is not an image or snapshot in an rbdfs mount")
        }
        // The mount's root: the topmost directory on the same device.
        var device = stat()
        guard stat(absolute, &device) == 0 else { throw ValidationError("\(path): \(String(cString: strerror(errno)))") }
        var top = URL(fileURLWithPath: absolute)
        while top.path != "/" {
            var parent = stat()
            let up = top.deletingLastPathComponent()
            guard stat(up.path, &parent) == 0, parent.st_dev == device.st_dev else { break }
            top = up
        }
        root = top.path
        let relative = String(absolute.dropFirst(root.count)).trimmingCharacters(in: CharacterSet(charactersIn: "/"))
        let pool = String(name.split(separator: "/").first ?? "")
        rootPool = relative.hasPrefix(pool + "/") ? nil : pool
    }

    /// The path of `pool[/ns]/image[@snap]` in this mount, or nil for another pool under a --pool mount.
    func path(of name: String) -> String? {
        guard let rootPool else { return root + "/" + name }
        guard name.hasPrefix(rootPool + "/") else { return nil }
        return root + "/" + name.dropFirst(rootPool.count + 1)
    }

    func describe(path: String) throws -> ImageFile {
        guard let list = Self.attributeNames(of: path) else {
            throw ValidationError("\(path): cannot read its attributes: \(String(cString: strerror(errno)))")
        }
        var attributes: [String: String] = [:]
        for name in list where name.hasPrefix("user.rbd.") {
            attributes[String(name.dropFirst("user.rbd.".count))] = Self.attribute(name, of: path)
        }
        return ImageFile(name: attributes["name"] ?? path, attributes: attributes)
    }

    func describe(name: String) throws -> ImageFile {
        guard let path = path(of: name) else { throw ValidationError("\(name) is outside this mount") }
        return try describe(path: path)
    }

    /// The image, its snapshots (files `image@snap` beside it) and their clones, recursively.
    func family(of image: String, depth: Int = 0) throws -> FamilyNode {
        guard let path = path(of: image), depth < 64 else { return FamilyNode(image: image, snapshots: []) }
        let directory = (path as NSString).deletingLastPathComponent
        let base = (path as NSString).lastPathComponent
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        var snapshots: [(String, [FamilyNode])] = []
        for entry in names.sorted() where entry.hasPrefix(base + "@") {
            let snapshotName = String(entry.dropFirst(base.count + 1))
            let clones = (try? describe(name: "\(image)@\(snapshotName)"))?.children ?? []
            snapshots.append((snapshotName, try clones.map { try family(of: $0, depth: depth + 1) }))
        }
        return FamilyNode(image: image, snapshots: snapshots)
    }

    static func attribute(_ name: String, of path: String) -> String? {
        MountedFileAttributes.value(name, of: path)
    }

    static func attributeNames(of path: String) -> [String]? {
        MountedFileAttributes.names(of: path)
    }
}
