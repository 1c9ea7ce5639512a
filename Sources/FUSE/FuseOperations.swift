import CFuse
import Foundation
import Logging
import RBDFS

/// The libfuse low-level operations table. Each handler finds the session from the request's userdata,
/// copies what it needs out of the C arguments (they die when the handler returns), asks the filesystem,
/// and replies exactly once — for reads, writes and flushes from the storage completion.
///
/// The handlers live in this nonisolated type, not in top-level code, so that Swift does not treat them as
/// main-actor code when libfuse calls them from its worker threads.
enum FuseOperations {
    static func table() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, connection in
            guard let userdata, let connection else { return }
            FuseOperations.session(userdata).configure(connection)
        }
        ops.lookup = { request, parent, name in
            guard let request, let cName = name else { return }
            let s = FuseOperations.session(request), name = String(cString: cName)
            s.begin(request, "lookup")
            do throws(FSError) {
                s.replyEntry(request, try s.filesystem.lookup(parent: parent, name: name))
            } catch {
                s.replyError(request, error, operation: "lookup \(name)")
            }
        }
        ops.forget = { request, inode, count in
            guard let request else { return }
            FuseOperations.session(request).filesystem.forget(inode, count: count)
            fuse_reply_none(request)
        }
        ops.forget_multi = { request, count, forgets in
            guard let request else { return }
            let s = FuseOperations.session(request)
            for item in UnsafeBufferPointer(start: forgets, count: count) {
                s.filesystem.forget(item.ino, count: item.nlookup)
            }
            fuse_reply_none(request)
        }
        ops.getattr = { request, inode, _ in
            guard let request else { return }
            let s = FuseOperations.session(request)
            s.begin(request, "getattr")
            do throws(FSError) {
                s.replyAttributes(request, try s.filesystem.getattr(inode))
            } catch {
                s.replyError(request, error, operation: "getattr")
            }
        }
        ops.setattr = { request, inode, attributes, toSet, _ in
            guard let request, let attributes else { return }
            let s = FuseOperations.session(request)
            s.begin(request, "setattr")
            var changes = AttributeChanges()
            if toSet & FUSE_SET_ATTR_SIZE != 0 { changes.size = UInt64(max(0, attributes.pointee.st_size)) }
            if toSet & FUSE_SET_ATTR_MODE != 0 { changes.mode = attributes.pointee.st_mode }
            if toSet & FUSE_SET_ATTR_UID != 0 { changes.uid = attributes.pointee.st_uid }
            if toSet & FUSE_SET_ATTR_GID != 0 { changes.gid = attributes.pointee.st_gid }
            let timeBits = FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW | FUSE_SET_ATTR_CTIME
            changes.times = toSet & timeBits != 0
            do throws(FSError) {
                s.replyAttributes(request, try s.filesystem.setattr(inode, changes: changes))
            } catch {
                s.replyError(request, error, operation: "setattr")
            }
        }
        ops.opendir = { request, inode, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request)
            s.begin(request, "opendir")
            do throws(FSError) {
                info.pointee.fh = try s.filesystem.openDirectory(inode)
                s.end(request, 0); fuse_reply_open(request, info)
            } catch {
                s.replyError(request, error, operation: "opendir")
            }
        }
        ops.readdir = { request, inode, size, offset, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request)
            s.begin(request, "readdir")
            s.readDirectory(request, inode: inode, size: size, offset: offset, handle: info.pointee.fh, plus: false)
        }
        ops.readdirplus = { request, inode, size, offset, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request)
            s.begin(request, "readdirplus")
            s.readDirectory(request, inode: inode, size: size, offset: offset, handle: info.pointee.fh, plus: true)
        }
        ops.releasedir = { request, _, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request)
            s.begin(request, "releasedir")
            s.filesystem.releaseDirectory(info.pointee.fh)
            s.replyOK(request)
        }
        ops.open = { request, inode, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request)
            s.begin(request, "open")
            do throws(FSError) {
                let flags = info.pointee.flags
                let handle = try s.filesystem.open(inode, flags: flags)
                s.end(request, 0)
                s.replyOpen(request, handle: handle,
                            direct: flags & Int32(CFUSE_O_DIRECT) != 0 && flags & O_ACCMODE != O_RDONLY)
            } catch {
                s.replyError(request, error, operation: "open")
            }
        }
        ops.read = { request, _, size, offset, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request), pending = PendingRequest(request)
            s.begin(request, "read")
            s.filesystem.read(info.pointee.fh, offset: UInt64(max(0, offset)), size: size) { result in
                switch result {
                case .success(let data): s.end(pending.request, 0); fuse_reply_buf(pending.request, data.baseAddress, data.count)
                case .failure(let error): s.replyError(pending.request, error, operation: "read at \(offset)")
                }
            }
        }
        ops.write = { request, _, buffer, size, offset, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request), pending = PendingRequest(request)
            s.begin(request, "write")
            let data = UnsafeRawBufferPointer(start: buffer, count: size)
            // The file's flags now (fcntl may have changed them since open): O_SYNC and O_DSYNC wait for the OSDs.
            // O_DIRECT does not: it bypasses the page cache, and like a disk's write cache (and librbd's default
            // write-around cache) what it acknowledges is durable at the next fsync / fdatasync.
            let writeThrough = info.pointee.flags & (O_SYNC | O_DSYNC) != 0 || !s.tuning.writeBehind
            s.filesystem.write(info.pointee.fh, offset: UInt64(max(0, offset)), data: data, writeThrough: writeThrough) { result in
                switch result {
                case .success(let count): s.end(pending.request, 0); fuse_reply_write(pending.request, count)
                case .failure(let error): s.replyError(pending.request, error, operation: "write at \(offset)")
                }
            }
        }
        ops.flush = { request, _, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request), pending = PendingRequest(request)
            s.begin(request, "flush")
            s.filesystem.flush(info.pointee.fh) { result in s.replyStatus(pending.request, result, operation: "flush") }
        }
        ops.fsync = { request, _, _, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request), pending = PendingRequest(request)
            s.begin(request, "fsync")
            s.filesystem.fsync(info.pointee.fh) { result in s.replyStatus(pending.request, result, operation: "fsync") }
        }
        ops.release = { request, _, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request)
            s.begin(request, "release")
            s.filesystem.release(info.pointee.fh)
            s.replyOK(request)
        }
        ops.statfs = { request, inode in
            guard let request else { return }
            let s = FuseOperations.session(request)
            s.begin(request, "statfs")
            do throws(FSError) {
                let stats = try s.filesystem.statfs(inode)
                var st = statvfs()
                st.f_bsize = UInt(stats.blockSize)
                st.f_frsize = UInt(stats.blockSize)
                st.f_blocks = fsblkcnt_t(stats.totalBlocks)
                st.f_bfree = fsblkcnt_t(stats.freeBlocks)
                st.f_bavail = fsblkcnt_t(stats.availableBlocks)
                st.f_files = fsfilcnt_t(stats.files)
                st.f_namemax = UInt(stats.nameMax)
                s.end(request, 0)
                fuse_reply_statfs(request, &st)
            } catch {
                s.replyError(request, error, operation: "statfs")
            }
        }
        ops.create = { request, parent, name, _, info in
            guard let request, let cName = name, let info else { return }
            let s = FuseOperations.session(request), name = String(cString: cName)
            s.begin(request, "create")
            do throws(FSError) {
                let (entry, handle) = try s.filesystem.create(parent: parent, name: name, flags: info.pointee.flags)
                info.pointee.fh = handle
                var parameters = s.entryParameters(entry)
                s.end(request, 0)
                if fuse_reply_create(request, &parameters, info) != 0 {
                    s.filesystem.forget(entry.inode, count: 1)
                    s.filesystem.release(handle)
                }
            } catch {
                s.replyError(request, error, operation: "create \(name)")
            }
        }
        ops.mknod = { request, parent, name, mode, _ in
            guard let request, let cName = name else { return }
            let s = FuseOperations.session(request), name = String(cString: cName)
            s.begin(request, "mknod")
            guard mode & Glibc.S_IFMT == Glibc.S_IFREG else {
                return s.replyError(request, .notPermitted(name, reason: "only regular files (images) can be made"), operation: "mknod \(name)")
            }
            do throws(FSError) {
                s.replyEntry(request, try s.filesystem.makeFile(parent: parent, name: name))
            } catch {
                s.replyError(request, error, operation: "mknod \(name)")
            }
        }
        ops.unlink = { request, parent, name in
            guard let request, let cName = name else { return }
            let s = FuseOperations.session(request), name = String(cString: cName)
            s.begin(request, "unlink")
            do throws(FSError) {
                try s.filesystem.unlink(parent: parent, name: name)
                s.replyOK(request)
            } catch {
                s.replyError(request, error, operation: "unlink \(name)")
            }
        }
        ops.rename = { request, parent, name, newParent, newName, flags in
            guard let request, let cName = name, let cNewName = newName else { return }
            let s = FuseOperations.session(request), name = String(cString: cName), newName = String(cString: cNewName)
            s.begin(request, "rename")
            do throws(FSError) {
                // RENAME_EXCHANGE has no RBD equivalent; plain renames never replace anyway.
                if flags & 2 != 0 {  // RENAME_EXCHANGE (linux/fs.h)
                    throw FSError.notSupported(name, reason: "exchanging names is not supported")
                }
                try s.filesystem.rename(parent: parent, name: name, newParent: newParent, newName: newName)
                s.replyOK(request)
            } catch {
                s.replyError(request, error, operation: "rename \(name) to \(newName)")
            }
        }
        ops.link = { request, inode, newParent, newName in
            guard let request, let cNewName = newName else { return }
            let s = FuseOperations.session(request), newName = String(cString: cNewName)
            s.begin(request, "link")
            do throws(FSError) {
                s.replyEntry(request, try s.filesystem.link(inode, newParent: newParent, newName: newName))
            } catch {
                s.replyError(request, error, operation: "link to \(newName)")
            }
        }
        ops.symlink = { request, _, _, name in
            guard let request, let cName = name else { return }
            let s = FuseOperations.session(request), name = String(cString: cName)
            s.begin(request, "symlink")
            s.replyError(request, .notPermitted(name, reason: "RBD has no symbolic links; ln (hard) snapshots and clones"), operation: "symlink \(name)")
        }
        ops.mkdir = { request, parent, name, _ in
            guard let request, let cName = name else { return }
            let s = FuseOperations.session(request), name = String(cString: cName)
            s.begin(request, "mkdir")
            do throws(FSError) {
                s.replyEntry(request, try s.filesystem.makeDirectory(parent: parent, name: name))
            } catch {
                s.replyError(request, error, operation: "mkdir \(name)")
            }
        }
        ops.rmdir = { request, parent, name in
            guard let request, let cName = name else { return }
            let s = FuseOperations.session(request), name = String(cString: cName)
            s.begin(request, "rmdir")
            do throws(FSError) {
                try s.filesystem.removeDirectory(parent: parent, name: name)
                s.replyOK(request)
            } catch {
                s.replyError(request, error, operation: "rmdir \(name)")
            }
        }
        ops.getxattr = { request, inode, name, size in
            guard let request, let cName = name else { return }
            let s = FuseOperations.session(request), name = String(cString: cName)
            s.begin(request, "getxattr")
            do throws(FSError) {
                s.replyExtendedAttribute(request, try s.filesystem.extendedAttribute(inode, name: name), size: size)
            } catch {
                s.replyError(request, error, operation: "getxattr \(name)")
            }
        }
        ops.listxattr = { request, inode, size in
            guard let request else { return }
            let s = FuseOperations.session(request)
            s.begin(request, "listxattr")
            do throws(FSError) {
                let names = try s.filesystem.listExtendedAttributes(inode)
                s.replyExtendedAttribute(request, names.flatMap { Array($0.utf8) + [0] }, size: size)
            } catch {
                s.replyError(request, error, operation: "listxattr")
            }
        }
        ops.setxattr = { request, inode, name, value, size, _ in
            guard let request, let cName = name else { return }
            let s = FuseOperations.session(request), name = String(cString: cName)
            s.begin(request, "setxattr")
            let bytes = value.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) } ?? []
            do throws(FSError) {
                try s.filesystem.setExtendedAttribute(inode, name: name, value: bytes)
                s.replyOK(request)
            } catch {
                s.replyError(request, error, operation: "setxattr \(name)")
            }
        }
        ops.removexattr = { request, inode, name in
            guard let request, let cName = name else { return }
            let s = FuseOperations.session(request), name = String(cString: cName)
            s.begin(request, "removexattr")
            do throws(FSError) {
                try s.filesystem.removeExtendedAttribute(inode, name: name)
                s.replyOK(request)
            } catch {
                s.replyError(request, error, operation: "removexattr \(name)")
            }
        }
        ops.fallocate = { request, _, mode, offset, length, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request), pending = PendingRequest(request)
            s.begin(request, "fallocate")
            s.filesystem.fallocate(info.pointee.fh, mode: mode, offset: UInt64(max(0, offset)), length: UInt64(max(0, length))) { result in
                s.replyStatus(pending.request, result, operation: "fallocate mode \(mode) at \(offset)+\(length)")
            }
        }
        ops.lseek = { request, _, offset, whence, info in
            guard let request, let info else { return }
            let s = FuseOperations.session(request)
            s.begin(request, "lseek")
            do throws(FSError) {
                let position = try s.filesystem.seek(info.pointee.fh, offset: UInt64(max(0, offset)), whence: whence)
                s.end(request, 0)
                fuse_reply_lseek(request, off_t(position))
            } catch {
                s.replyError(request, error, operation: "lseek whence \(whence) at \(offset)")
            }
        }
        return ops
    }

    static func session(_ request: fuse_req_t) -> FuseSession {
        session(fuse_req_userdata(request)!)
    }

    static func session(_ userdata: UnsafeMutableRawPointer) -> FuseSession {
        Unmanaged<FuseSession>.fromOpaque(userdata).takeUnretainedValue()
    }
}

/// A request answered later, from a storage completion thread. libfuse allows a reply from any thread.
struct PendingRequest: @unchecked Sendable {
    let request: fuse_req_t
    init(_ request: fuse_req_t) { self.request = request }
}

extension FuseSession {
    /// Negotiates the connection: 1 MiB requests, many in the background, and what the kernel may cache.
    func configure(_ connection: UnsafeMutablePointer<fuse_conn_info>) {
        connection.pointee.max_write = tuning.maxWrite
        // The kernel caps the bdi's readahead (set at mount) to this when INIT completes.
        connection.pointee.max_readahead = UInt32(max(Int(tuning.maxWrite), (tuning.readAheadKiB ?? 0) * 1024))
        connection.pointee.max_background = tuning.maxBackground
        connection.pointee.congestion_threshold = tuning.maxBackground * 3 / 4
        logger.debug("FUSE connection: protocol \(connection.pointee.proto_major).\(connection.pointee.proto_minor), max_write \(connection.pointee.max_write)")
    }

    /// The open reply. An O_DIRECT open for writing gets the kernel's direct-I/O mode with parallel direct
    /// writes: otherwise the kernel takes the inode lock for every O_DIRECT write and serves one write per
    /// image at a time, whatever the number of writers (4 KiB random writes, 4 jobs: 1,340 IOPS without,
    /// see docs/PERFORMANCE.md). The price: in that mode the kernel sends one large synchronous write (dd
    /// oflag=direct bs=4M) as 1 MiB requests one after the other rather than together. Read-only O_DIRECT
    /// opens keep the default mode, where a large read goes out as parallel requests; buffered opens keep
    /// the page cache.
    func replyOpen(_ request: fuse_req_t, handle: UInt64, direct: Bool) {
        let flags: UInt32 = direct ? CFUSE_FOPEN_DIRECT_IO | CFUSE_FOPEN_PARALLEL_DIRECT_WRITES : 0
        if CFuse_reply_open_flags(request, handle, flags) == -ENOENT {
            // The opener was interrupted and is gone: the kernel will never release this handle.
            filesystem.release(handle)
        }
    }

    /// getxattr / listxattr: a zero size asks for the length; a buffer too small is ERANGE.
    func replyExtendedAttribute(_ request: fuse_req_t, _ value: [UInt8], size: Int) {
        end(request, value.count > size && size != 0 ? ERANGE : 0)
        if size == 0 {
            fuse_reply_xattr(request, value.count)
        } else if value.count > size {
            fuse_reply_err(request, ERANGE)
        } else {
            value.withUnsafeBytes { _ = fuse_reply_buf(request, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
        }
    }

    /// A successful reply that carries no data.
    func replyOK(_ request: fuse_req_t) {
        end(request, 0)
        fuse_reply_err(request, 0)
    }

    func replyStatus(_ request: fuse_req_t, _ result: Result<Void, FSError>, operation: String) {
        switch result {
        case .success: replyOK(request)
        case .failure(let error): replyError(request, error, operation: operation)
        }
    }

    /// Pages through the listing taken at opendir. Offsets are positions: 1 and 2 are "." and "..", the
    /// listed items follow. In readdirplus every item handed over counts a lookup; one that does not fit is
    /// undone.
    func readDirectory(_ request: fuse_req_t, inode: fuse_ino_t, size: Int, offset: off_t, handle: UInt64, plus: Bool) {
        let items: [DirectoryItem]
        do {
            items = try filesystem.directoryItems(handle)
        } catch {
            return replyError(request, error, operation: plus ? "readdirplus" : "readdir")
        }
        let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: size)
        defer { buffer.deallocate() }
        var used = 0
        var position = Int(offset)
        let total = items.count + 2
        while position < total {
            let name: String
            var entry = fuse_entry_param()
            var remembered: UInt64?
            if position < 2 {
                name = position == 0 ? "." : ".."
                entry.attr.st_ino = UInt(position == 0 ? inode : InodeTable.rootInode)
                entry.attr.st_mode = Glibc.S_IFDIR
            } else {
                let item = items[position - 2]
                name = item.name
                if plus, let full = filesystem.entry(forListed: item) {
                    entry = entryParameters(full)
                    remembered = full.inode
                } else {
                    // d_ino only: a real inode is assigned when the kernel looks the name up.
                    entry.attr.st_ino = UInt(filesystem.inodes.existingInode(of: item.key) ?? (1 << 40) + UInt64(position))
                    entry.attr.st_mode = item.kind == .directory ? Glibc.S_IFDIR : Glibc.S_IFREG
                }
            }
            let needed = name.withCString { cName in
                plus
                    ? fuse_add_direntry_plus(request, buffer + used, size - used, cName, &entry, off_t(position + 1))
                    : fuse_add_direntry(request, buffer + used, size - used, cName, &entry.attr, off_t(position + 1))
            }
            if needed > size - used {
                if let remembered { filesystem.forget(remembered, count: 1) }
                break
            }
            used += needed
            position += 1
        }
        end(request, 0)
        fuse_reply_buf(request, buffer, used)
    }
}
