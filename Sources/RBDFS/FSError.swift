import Logging
import Storage
import SystemPackage

/// Why a filesystem operation was refused or failed. The FUSE adapter logs every one (one line naming the
/// path and the operation) and replies with `errno`; this file is the only errno mapping in rbdfs.
public enum FSError: Error, Sendable, CustomStringConvertible {
    /// A librbd / librados call failed; its errno reaches the caller unchanged.
    case storage(StorageError)
    case notFound(String)
    case invalidName(NameError)
    /// Writes to a snapshot, or anything that changes data on a `--read-only` mount.
    case readOnly(String, reason: String)
    case notDirectory(String)
    case isDirectory(String)
    case exists(String)
    /// A directory that still holds something (pool with images, namespace with images).
    case notEmpty(String, reason: String)
    /// A deliberate refusal by a safety rule (shrinking an image that holds data, ...).
    case notPermitted(String, reason: String)
    case crossDevice(String)
    case notSupported(String, reason: String)
    case invalidArgument(String, reason: String)
    case noAttribute(String)
    /// A file handle or inode the kernel should no longer be using.
    case staleHandle(String)
    case busy(String, reason: String)
    /// SEEK_DATA past the last data, or SEEK_DATA / SEEK_HOLE at or past the end.
    case noDataPastOffset(String, offset: UInt64)

    public var errno: Errno {
        switch self {
        case .storage(let error):
            // The cluster refusing a client (cephx caps, mon_allow_pool_delete) is a permission denial to the
            // user; EPERM from rbdfs itself stays the deliberate "refused by a safety rule".
            return error.errno == .notPermitted ? .permissionDenied : error.errno
        case .notFound: return .noSuchFileOrDirectory
        case .invalidName(let error):
            switch error {
            case .invalid: return .invalidArgument
            case .tooLong: return .fileNameTooLong
            }
        case .readOnly: return .readOnlyFileSystem
        case .notDirectory: return .notDirectory
        case .isDirectory: return .isDirectory
        case .exists: return .fileExists
        case .notEmpty: return .directoryNotEmpty
        case .notPermitted: return .notPermitted
        case .crossDevice: return .improperLink
        case .notSupported: return .notSupported
        case .invalidArgument: return .invalidArgument
        case .noAttribute: return Errno(rawValue: 61)  // ENODATA, which SystemPackage does not name on Linux
        case .staleHandle: return .staleNFSFileHandle
        case .busy: return .resourceBusy
        case .noDataPastOffset: return .noSuchAddressOrDevice
        }
    }

    /// How loudly to log it: a lookup of a missing name is routine, a failed librbd call is not.
    public var logLevel: Logger.Level {
        switch self {
        case .notFound, .noAttribute, .noDataPastOffset: return .debug
        case .storage(let error) where error.errno == .noSuchFileOrDirectory: return .debug
        case .storage: return .error
        case .invalidName, .readOnly, .notDirectory, .isDirectory, .exists, .notEmpty, .notPermitted,
             .crossDevice, .notSupported, .invalidArgument, .staleHandle, .busy:
            return .warning
        }
    }

    public var description: String {
        switch self {
        case .storage(let error): return error.description
        case .notFound(let path): return "\(path): no such pool, namespace, image or snapshot"
        case .invalidName(.invalid(let name, let reason)): return "'\(name)': invalid name: \(reason)"
        case .invalidName(.tooLong(let name, let limit)): return "'\(name)': name longer than \(limit) bytes"
        case .readOnly(let path, let reason): return "\(path): read-only: \(reason)"
        case .notDirectory(let path): return "\(path): not a directory"
        case .isDirectory(let path): return "\(path): is a directory"
        case .exists(let path): return "\(path): already exists"
        case .notEmpty(let path, let reason): return "\(path): not empty: \(reason)"
        case .notPermitted(let path, let reason): return "\(path): refused: \(reason)"
        case .crossDevice(let path): return "\(path): cannot move across pools"
        case .notSupported(let path, let reason): return "\(path): not supported: \(reason)"
        case .invalidArgument(let path, let reason): return "\(path): invalid argument: \(reason)"
        case .noAttribute(let name): return "no attribute \(name)"
        case .staleHandle(let what): return "\(what): stale handle"
        case .busy(let path, let reason): return "\(path): busy: \(reason)"
        case .noDataPastOffset(let path, let offset): return "\(path): no data at or after offset \(offset)"
        }
    }
}

extension FSError {
    /// Runs a storage call, turning its StorageError into `.storage`.
    static func wrap<T>(_ body: () throws -> T) throws(FSError) -> T {
        do {
            return try body()
        } catch let error as StorageError {
            throw .storage(error)
        } catch let error as FSError {
            throw error
        } catch {
            fatalError("storage calls throw StorageError only, got \(error)")
        }
    }
}
