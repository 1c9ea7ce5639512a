import Foundation
internal import CRBD

/// One compound librados read operation on one object, made of OSD object class method calls
/// (`rados_read_op_exec`), sent asynchronously. The OSD runs the calls in order, atomically; each call's
/// reply and return value are kept here until this object goes away.
///
/// Not thread-safe: one thread builds it, submits it, and reads the replies once it has completed.
final class ObjectClassRead {
    private let op: rados_read_op_t
    /// Per call, where librados writes its reply buffer (allocated by librados), its length and its
    /// return value. They must stay put until the operation completes, so they live outside Swift's objects.
    private var outputs: [UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>] = []
    private var lengths: [UnsafeMutablePointer<Int>] = []
    private var returnValues: [UnsafeMutablePointer<Int32>] = []
    private var isSubmitted = false

    init() {
        op = rados_create_read_op()
    }

    deinit {
        for output in outputs {
            if let buffer = output.pointee { rados_buffer_free(buffer) }
            output.deallocate()
        }
        lengths.forEach { $0.deallocate() }
        returnValues.forEach { $0.deallocate() }
        rados_release_read_op(op)
    }

    var count: Int { outputs.count }

    /// Adds a call of `method` of object class `objectClass`; returns its index for `reply(_:)`. A call that
    /// `mayFail` does not fail the whole operation: its error is only its own.
    @discardableResult
    func call(_ objectClass: String, _ method: String, input: [UInt8] = [], mayFail: Bool = false) -> Int {
        precondition(!isSubmitted, "a read operation takes no calls once submitted")
        let output = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: 1)
        output.initialize(to: nil)
        let length = UnsafeMutablePointer<Int>.allocate(capacity: 1)
        length.initialize(to: 0)
        let returnValue = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
        returnValue.initialize(to: -EIO)
        outputs.append(output)
        lengths.append(length)
        returnValues.append(returnValue)
        // librados copies the input and the names at once.
        input.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) { chars in
                rados_read_op_exec(op, objectClass, method, chars.baseAddress, chars.count, output, length,
                                   returnValue)
            }
        }
        if mayFail {
            rados_read_op_set_flags(op, Int32(LIBRADOS_OP_FLAG_FAILOK))
        }
        return outputs.count - 1
    }

    /// Sends the operation on `object`; `onComplete` gets its return value (`-errno` on failure) exactly
    /// once, on a librados thread or, if it could not be sent, at once on this one. Keep this object until then.
    func submit(in io: IOContext, object: String, onComplete: @escaping (Int) -> Void) {
        precondition(!isSubmitted, "a read operation is sent once")
        isSubmitted = true
        startRadosAsync({ rados_aio_read_op_operate(op, io.raw, $0, object, 0) }, onComplete: onComplete)
    }

    /// Call `index`'s reply, or its return value if that is an error. Only once the operation has completed
    /// (and, for a call that may not fail, succeeded).
    func reply(_ index: Int) -> Result<[UInt8], ReturnCode> {
        let code = returnValues[index].pointee
        guard code >= 0 else { return .failure(ReturnCode(value: code)) }
        guard let buffer = outputs[index].pointee else { return .success([]) }
        let bytes = UnsafeRawBufferPointer(start: buffer, count: lengths[index].pointee)
        return .success(Array(bytes))
    }

    /// A negative return value of one call.
    struct ReturnCode: Error {
        var value: Int32
    }
}

/// Sends `ObjectClassRead`s and runs what each one's completion calls for on the one thread that calls
/// `run`, so the code that reads metadata objects needs no locks: librados's callbacks only post here.
final class ObjectReadLoop {
    private let events = ReadEvents()
    /// What to do when each read in flight completes, by token.
    private var handlers: [Int: (Int) -> Void] = [:]
    private var nextToken = 0

    /// Sends `read` on `object`; `handle` gets it and its return value on the thread of `run`.
    func send(
        _ read: ObjectClassRead, in io: IOContext, to object: String,
        then handle: @escaping (ObjectClassRead, Int) -> Void
    ) {
        let token = nextToken
        nextToken += 1
        // Keeps the read (its reply buffers) and the I/O context alive until the handler has run.
        handlers[token] = { code in withExtendedLifetime(io) { handle(read, code) } }
        let events = self.events
        read.submit(in: io, object: object) { code in events.post(token, code) }
    }

    /// Runs handlers until no read is in flight; a handler may send further reads.
    func run() {
        while !handlers.isEmpty {
            for (token, code) in events.take() {
                handlers.removeValue(forKey: token)!(code)
            }
        }
    }
}

/// Where librados's completions meet the thread of an `ObjectReadLoop`.
private final class ReadEvents: @unchecked Sendable {
    private let condition = NSCondition()
    /// Guarded by `condition`.
    private var completed: [(token: Int, code: Int)] = []

    func post(_ token: Int, _ code: Int) {
        condition.withLock {
            completed.append((token, code))
            condition.signal()
        }
    }

    /// Waits for at least one read to complete, and takes every one that has.
    func take() -> [(token: Int, code: Int)] {
        condition.withLock {
            while completed.isEmpty { condition.wait() }
            defer { completed = [] }
            return completed
        }
    }
}

/// What to do with one asynchronous librados operation's return value.
private final class RadosCompletionContext {
    let onComplete: (Int) -> Void

    init(_ onComplete: @escaping (Int) -> Void) {
        self.onComplete = onComplete
    }
}

/// librados calls this on one of its finisher threads, holding a reference of its own to the completion,
/// so releasing ours here is safe.
private let radosCompletionCallback: rados_callback_t = { completion, argument in
    let context = Unmanaged<RadosCompletionContext>.fromOpaque(argument!).takeRetainedValue()
    let returnValue = rados_aio_get_return_value(completion)
    rados_aio_release(completion)
    context.onComplete(Int(returnValue))
}

/// Starts an asynchronous librados operation, as `startAsync` does for librbd's.
func startRadosAsync(_ submit: (rados_completion_t) -> Int32, onComplete: @escaping (Int) -> Void) {
    let context = Unmanaged.passRetained(RadosCompletionContext(onComplete))
    var completion: rados_completion_t?
    let created = rados_aio_create_completion2(context.toOpaque(), radosCompletionCallback, &completion)
    guard created >= 0, let completion else {
        context.release()
        onComplete(Int(created < 0 ? created : -ENOMEM))
        return
    }
    let submitted = submit(completion)
    if submitted < 0 {
        rados_aio_release(completion)
        context.release()
        onComplete(Int(submitted))
    }
}
