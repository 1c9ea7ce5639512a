import Storage
import SystemPackage

// What the handles do, on the store's state. Every function here expects the caller to hold the lock,
// except `performFlatten`, which takes it per object as librbd's flatten works object by object.

extension MemoryStore {
    /// Using a closed handle is a programming error (in librbd, a use after free).
    func checkOpen(_ handle: MemoryImageHandle) {
        precondition(openHandles[handle.serial] != nil, "\(handle.target): handle used after close()")
    }

    /// The image (and snapshot) a handle reads: ENOENT once it is removed.
    func openedImage(_ handle: MemoryImageHandle, operation: String) throws
        -> (image: ImageRecord, snapshot: SnapshotRecord?) {
        guard let image = images[handle.imageID] else {
            throw StorageError(.noSuchFileOrDirectory, operation: operation, target: handle.target)
        }
        guard let snapshotID = handle.snapshotID else { return (image, nil) }
        guard let index = image.snapshotIndex(id: snapshotID) else {
            throw StorageError(.noSuchFileOrDirectory, operation: operation, target: handle.target)
        }
        return (image, image.snapshots[index])
    }

    /// Checks the handle is open, counts the call, takes its injected fault, and finds what it reads.
    func beginHandleCall(_ handle: MemoryImageHandle, _ operation: String) throws
        -> (image: ImageRecord, snapshot: SnapshotRecord?) {
        checkOpen(handle)
        try beginCall(operation, spec: handle.spec, target: handle.target)
        return try openedImage(handle, operation: operation)
    }

    /// The head an operation may change: EROFS through a read-only or snapshot handle.
    func writableImage(_ handle: MemoryImageHandle, operation: String) throws -> ImageRecord {
        let image = try openedImage(handle, operation: operation).image
        guard !handle.isReadOnly else {
            throw StorageError(.readOnlyFileSystem, operation: operation, target: handle.target)
        }
        if image.features & RBDFeature.exclusiveLock != 0 { image.lockOwner = handle.serial }
        return image
    }

    // MARK: I/O

    /// librbd's `clip_io`: a zero-length request is always fine, one starting at or past the end is EINVAL,
    /// one crossing the end is cut at the end. Returns the length to do.
    func clippedLength(offset: UInt64, length: UInt64, size: UInt64, operation: String, target: String) throws
        -> UInt64 {
        guard length > 0 else { return 0 }
        guard offset < size else { throw StorageError(.invalidArgument, operation: operation, target: target) }
        return min(length, size - offset)
    }

    func performRead(_ handle: MemoryImageHandle, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer)
        throws -> Int {
        let operation = "rbd_aio_read"
        let (image, snapshot) = try openedImage(handle, operation: operation)
        let version = snapshot.map(image.version(of:)) ?? image.headVersion
        let length = try clippedLength(offset: offset, length: UInt64(buffer.count), size: version.size,
                                       operation: operation, target: handle.target)
        guard length > 0 else { return 0 }
        try readBytes(of: version, at: offset, into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<Int(length)]),
                      operation: operation, target: handle.target)
        image.accessTime = clock()
        return Int(length)
    }

    func performWrite(_ handle: MemoryImageHandle, at offset: UInt64, bytes: [UInt8]) throws {
        let operation = "rbd_aio_write"
        let image = try writableImage(handle, operation: operation)
        let length = try clippedLength(offset: offset, length: UInt64(bytes.count), size: image.size,
                                       operation: operation, target: handle.target)
        guard length > 0 else { return }
        for piece in objectPieces(offset: offset, length: length, objectSize: image.objectSize) {
            try makeOwnObject(image, piece.objectNumber, operation: operation, target: handle.target)
            let source = Int(piece.offsetInRange)
            image.objects[piece.objectNumber]!.generation = newGeneration()
            bytes.withUnsafeBytes { data in
                let slice = UnsafeRawBufferPointer(rebasing: data[source..<(source + Int(piece.length))])
                modifyBytes(of: image, piece.objectNumber) { store(slice, into: &$0, at: Int(piece.offsetInObject)) }
            }
        }
        image.modifyTime = clock()
    }

    /// Discard (`zeroPartialObjects` false) releases the objects the range covers whole and leaves the rest,
    /// as `rbd_skip_partial_discard` does; write-zeroes also zeroes the partial parts. An object running to
    /// the image end counts as whole when the range reaches that end. In a clone, a released object the
    /// parent has data in stays as an empty object, so the parent's data does not show through again.
    func performZeroing(_ handle: MemoryImageHandle, at offset: UInt64, length: UInt64, operation: String,
                        zeroPartialObjects: Bool) throws {
        let image = try writableImage(handle, operation: operation)
        let length = try clippedLength(offset: offset, length: length, size: image.size, operation: operation,
                                       target: handle.target)
        guard length > 0 else { return }
        let end = offset + length
        let objectSize = image.objectSize
        let firstWhole = divideRoundingUp(offset, objectSize)
        let wholeEnd = end == image.size ? divideRoundingUp(end, objectSize) : end / objectSize
        if firstWhole < wholeEnd {
            try releaseObjects(image, firstWhole..<wholeEnd, operation: operation, target: handle.target)
            if zeroPartialObjects {
                if offset < firstWhole * objectSize {
                    try zeroBytes(image, offset..<(firstWhole * objectSize), operation: operation, target: handle.target)
                }
                if wholeEnd * objectSize < end {
                    try zeroBytes(image, (wholeEnd * objectSize)..<end, operation: operation, target: handle.target)
                }
            }
        } else if zeroPartialObjects {
            try zeroBytes(image, offset..<end, operation: operation, target: handle.target)
        }
        image.modifyTime = clock()
    }

    /// Fills `destination` with the version's bytes from `offset`: own objects first, then, inside the
    /// overlap, the parent snapshot's data (recursively), zeros elsewhere.
    func readBytes(of version: DataVersion, at offset: UInt64, into destination: UnsafeMutableRawBufferPointer,
                   operation: String, target: String) throws {
        for piece in objectPieces(offset: offset, length: UInt64(destination.count), objectSize: version.objectSize) {
            let lower = Int(piece.offsetInRange)
            let slice = UnsafeMutableRawBufferPointer(rebasing: destination[lower..<(lower + Int(piece.length))])
            let position = offset + piece.offsetInRange
            if let object = version.objects[piece.objectNumber] {
                copy(object.bytes, from: Int(piece.offsetInObject), into: slice)
            } else if let parent = version.parent, position < parent.overlap {
                let fromParent = Int(min(piece.length, parent.overlap - position))
                try readBytes(of: try parentVersion(parent, operation: operation, target: target), at: position,
                              into: UnsafeMutableRawBufferPointer(rebasing: slice[..<fromParent]),
                              operation: operation, target: target)
                zero(UnsafeMutableRawBufferPointer(rebasing: slice[fromParent...]))
            } else {
                zero(slice)
            }
        }
    }

    /// The bytes a clone's object starts with when first written: the parent's data of that object up to the
    /// overlap, or nothing when the parent has none there (librbd skips an all-zero copy-up).
    func copyUpBytes(_ image: ImageRecord, _ objectNumber: UInt64, operation: String, target: String) throws
        -> [UInt8] {
        let start = objectNumber * image.objectSize
        guard let parent = image.parent, start < parent.overlap else { return [] }
        let end = min(start + image.objectSize, parent.overlap)
        var bytes = zeroedBytes(Int(end - start))
        try bytes.withUnsafeMutableBytes { buffer in
            try readBytes(of: try parentVersion(parent, operation: operation, target: target), at: start,
                          into: buffer, operation: operation, target: target)
        }
        return isAllZero(bytes) ? [] : bytes
    }

    /// Makes sure the head has its own copy of the object, copying up from the parent first in a clone.
    func makeOwnObject(_ image: ImageRecord, _ objectNumber: UInt64, operation: String, target: String) throws {
        guard image.objects[objectNumber] == nil else { return }
        let bytes = try copyUpBytes(image, objectNumber, operation: operation, target: target)
        image.objects[objectNumber] = StoredObject(bytes: bytes, generation: newGeneration())
    }

    /// Changes an object's bytes in place (copied first only if a snapshot still shares them).
    func modifyBytes(of image: ImageRecord, _ objectNumber: UInt64, _ change: (inout [UInt8]) -> Void) {
        change(&image.objects[objectNumber]!.bytes)
    }

    /// Zeroes part of objects; zeroing up to an object's end truncates it, as librbd does.
    func zeroBytes(_ image: ImageRecord, _ range: Range<UInt64>, operation: String, target: String) throws {
        for piece in objectPieces(offset: range.lowerBound, length: UInt64(range.count), objectSize: image.objectSize) {
            if image.objects[piece.objectNumber] == nil {
                // Nothing of its own: only parent data would need hiding, and only if there is some.
                let bytes = try copyUpBytes(image, piece.objectNumber, operation: operation, target: target)
                guard !bytes.isEmpty else { continue }
                image.objects[piece.objectNumber] = StoredObject(bytes: bytes, generation: 0)
            }
            image.objects[piece.objectNumber]!.generation = newGeneration()
            let start = Int(piece.offsetInObject)
            let end = start + Int(piece.length)
            modifyBytes(of: image, piece.objectNumber) { objectBytes in
                if end >= objectBytes.count {
                    truncate(&objectBytes, to: start)
                } else {
                    fillZeros(&objectBytes, in: start..<end)
                }
            }
        }
    }

    /// Drops whole objects; in a clone, those the parent has data in become empty objects that hide it.
    func releaseObjects(_ image: ImageRecord, _ objectNumbers: Range<UInt64>, operation: String, target: String)
        throws {
        for objectNumber in image.objects.keys where objectNumbers.contains(objectNumber) {
            image.objects[objectNumber] = nil
        }
        let objectSize = image.objectSize
        let released = (objectNumbers.lowerBound * objectSize)..<(objectNumbers.upperBound * objectSize)
        guard let parent = image.parent, let shown = clipped(released, to: 0..<parent.overlap) else { return }
        let parentData = try allocatedExtents(of: try parentVersion(parent, operation: operation, target: target),
                                              in: shown, operation: operation, target: target)
        for extent in parentData {
            for objectNumber in (extent.lowerBound / objectSize)..<divideRoundingUp(extent.upperBound, objectSize) {
                image.objects[objectNumber] = StoredObject(bytes: [], generation: newGeneration())
            }
        }
    }

    /// Extents in `range` (clipped to the version's size) of objects holding data, own or, inside the
    /// overlap, the parent's (widened to this image's objects); merged, clipped to the range.
    func allocatedExtents(of version: DataVersion, in range: Range<UInt64>, operation: String, target: String)
        throws -> [Range<UInt64>] {
        guard let bounded = clipped(range, to: 0..<version.size) else { return [] }
        var extents = version.ownExtents(in: bounded)
        if let parent = version.parent, let parentRange = clipped(bounded, to: 0..<parent.overlap) {
            let objectSize = version.objectSize
            let parentData = try allocatedExtents(of: try parentVersion(parent, operation: operation, target: target),
                                                  in: parentRange, operation: operation, target: target)
            for extent in parentData {
                let widened = (extent.lowerBound / objectSize * objectSize)
                    ..< (divideRoundingUp(extent.upperBound, objectSize) * objectSize)
                if let extent = clipped(widened, to: bounded) { extents.append(extent) }
            }
        }
        return merged(extents)
    }

    // MARK: Size, snapshots, flatten

    /// A shrink drops the objects past the new end, truncates the last one, and lowers a clone's overlap
    /// (growing again never shows the parent's data past it).
    func performResize(_ handle: MemoryImageHandle, to newSize: UInt64) throws {
        let operation = "rbd_resize2"
        _ = try beginHandleCall(handle, operation)
        let image = try writableImage(handle, operation: operation)
        if newSize < image.size {
            let objectSize = image.objectSize
            let keptObjects = divideRoundingUp(newSize, objectSize)
            for objectNumber in image.objects.keys where objectNumber >= keptObjects {
                image.objects[objectNumber] = nil
            }
            let tailLength = Int(newSize % objectSize)
            if tailLength > 0, let tail = image.objects[keptObjects - 1], tail.bytes.count > tailLength {
                image.objects[keptObjects - 1]!.generation = newGeneration()
                modifyBytes(of: image, keptObjects - 1) { truncate(&$0, to: tailLength) }
            }
            if let parent = image.parent {
                image.parent!.overlap = min(parent.overlap, newSize)
            }
        }
        image.size = newSize
        notifyHandles(of: image.id, except: handle.serial)
    }

    func performCreateSnapshot(_ handle: MemoryImageHandle, name: String) throws {
        let operation = "rbd_snap_create"
        let target = handle.spec.describing(snapshot: name)
        _ = try beginHandleCall(handle, operation)
        let image = try writableImage(handle, operation: operation)
        guard !name.isEmpty else { throw StorageError(.invalidArgument, operation: operation, target: target) }
        guard image.snapshot(named: name) == nil else {
            throw StorageError(.fileExists, operation: operation, target: target)
        }
        image.snapshots.append(SnapshotRecord(
            id: nextSnapshotID, name: name, size: image.size, timestamp: clock(), isProtected: false,
            objects: image.objects, parent: image.parent))
        nextSnapshotID += 1
        notifyHandles(of: image.id, except: handle.serial)
    }

    /// EBUSY while protected (clones can only hang off protected snapshots, so this covers them).
    func performRemoveSnapshot(_ handle: MemoryImageHandle, name: String) throws {
        let operation = "rbd_snap_remove"
        let target = handle.spec.describing(snapshot: name)
        _ = try beginHandleCall(handle, operation)
        let image = try writableImage(handle, operation: operation)
        guard let index = image.snapshots.firstIndex(where: { $0.name == name }) else {
            throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
        }
        guard !image.snapshots[index].isProtected else {
            throw StorageError(.resourceBusy, operation: operation, target: target)
        }
        let removed = image.snapshots.remove(at: index)
        notifyHandles(of: image.id, except: handle.serial)
        if let parent = removed.parent, parent != image.parent {
            notifyHandles(of: parent.imageID, except: nil)  // its snapshot may have lost a child
        }
    }

    func performRenameSnapshot(_ handle: MemoryImageHandle, name: String, to newName: String) throws {
        let operation = "rbd_snap_rename"
        let target = handle.spec.describing(snapshot: name)
        _ = try beginHandleCall(handle, operation)
        let image = try writableImage(handle, operation: operation)
        guard let index = image.snapshots.firstIndex(where: { $0.name == name }) else {
            throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
        }
        let newTarget = handle.spec.describing(snapshot: newName)
        guard !newName.isEmpty else { throw StorageError(.invalidArgument, operation: operation, target: newTarget) }
        guard image.snapshot(named: newName) == nil else {
            throw StorageError(.fileExists, operation: operation, target: newTarget)
        }
        image.snapshots[index].name = newName
        notifyHandles(of: image.id, except: handle.serial)
    }

    /// As librbd: ENOSYS without the layering feature; protecting a protected snapshot is EBUSY,
    /// unprotecting an unprotected one EINVAL, unprotecting one with clones EBUSY.
    func performSetProtection(_ handle: MemoryImageHandle, name: String, protect: Bool) throws {
        let operation = protect ? "rbd_snap_protect" : "rbd_snap_unprotect"
        let target = handle.spec.describing(snapshot: name)
        _ = try beginHandleCall(handle, operation)
        let image = try writableImage(handle, operation: operation)
        guard image.features & RBDFeature.layering != 0 else {
            throw StorageError(.noFunction, operation: operation, target: target)
        }
        guard let index = image.snapshots.firstIndex(where: { $0.name == name }) else {
            throw StorageError(.noSuchFileOrDirectory, operation: operation, target: target)
        }
        let snapshot = image.snapshots[index]
        if protect {
            guard !snapshot.isProtected else { throw StorageError(.resourceBusy, operation: operation, target: target) }
        } else {
            guard snapshot.isProtected else { throw StorageError(.invalidArgument, operation: operation, target: target) }
            guard children(ofImage: image.id, snapshotID: snapshot.id).isEmpty else {
                throw StorageError(.resourceBusy, operation: operation, target: target)
            }
        }
        image.snapshots[index].isProtected = protect
        notifyHandles(of: image.id, except: handle.serial)
    }

    /// Copies up every object of the overlap the clone does not have yet, one object per lock hold (writes
    /// may go on meanwhile, as with librbd), calling `progress` after each; then detaches the head. The
    /// clone's snapshots keep their parent. EINVAL if the image has no parent, EROFS through a read-only handle.
    func performFlatten(_ handle: MemoryImageHandle, progress: (@Sendable (UInt64, UInt64) -> Void)?) throws {
        let operation = "rbd_flatten_with_progress"
        let objectCount: UInt64 = try locked {
            _ = try beginHandleCall(handle, operation)
            let image = try writableImage(handle, operation: operation)
            guard let parent = image.parent else {
                throw StorageError(.invalidArgument, operation: operation, target: handle.target)
            }
            return divideRoundingUp(parent.overlap, image.objectSize)
        }
        for objectNumber in 0..<objectCount {
            try locked {
                let image = try writableImage(handle, operation: operation)
                guard image.objects[objectNumber] == nil else { return }
                let bytes = try copyUpBytes(image, objectNumber, operation: operation, target: handle.target)
                if !bytes.isEmpty {
                    image.objects[objectNumber] = StoredObject(bytes: bytes, generation: newGeneration())
                }
            }
            progress?(objectNumber + 1, objectCount)
        }
        try locked {
            let image = try writableImage(handle, operation: operation)
            guard let parent = image.parent else { return }
            image.parent = nil
            notifyHandles(of: image.id, except: handle.serial)
            notifyHandles(of: parent.imageID, except: nil)  // its snapshot may have lost a child
        }
    }
}

func divideRoundingUp(_ value: UInt64, _ divisor: UInt64) -> UInt64 {
    value / divisor + (value % divisor == 0 ? 0 : 1)
}
