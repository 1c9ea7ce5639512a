import CFuse
import Foundation

/// Extended attributes of a file as a client of the mount reads them (getxattr / listxattr), for tools
/// such as `rbdfs info` that look at a mount from outside.
public enum MountedFileAttributes {
    /// The value of one attribute, or nil (errno set) if it cannot be read.
    public static func value(_ name: String, of path: String) -> String? {
        let size = getxattr(path, name, nil, 0)
        guard size >= 0 else { return nil }
        var buffer = [UInt8](repeating: 0, count: size)
        let read = getxattr(path, name, &buffer, size)
        guard read >= 0 else { return nil }
        return String(decoding: buffer.prefix(read), as: UTF8.self)
    }

    /// The names of a file's attributes, or nil (errno set) if they cannot be listed.
    public static func names(of path: String) -> [String]? {
        let size = listxattr(path, nil, 0)
        guard size >= 0 else { return nil }
        var buffer = [CChar](repeating: 0, count: size)
        let read = listxattr(path, &buffer, size)
        guard read >= 0 else { return nil }
        return buffer.prefix(read).split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
    }
}
