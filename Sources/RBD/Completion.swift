internal import CRBD

/// What to do with one asynchronous librbd operation's return value.
private final class CompletionContext {
    let onComplete: (Int) -> Void

    init(_ onComplete: @escaping (Int) -> Void) {
        self.onComplete = onComplete
    }
}

/// librbd calls this on one of its threads when an operation finishes; the completion is released
/// before the Swift closure runs, so the closure may start the next operation at once.
private let completionCallback: rbd_callback_t = { completion, argument in
    let context = Unmanaged<CompletionContext>.fromOpaque(argument!).takeRetainedValue()
    let returnValue = rbd_aio_get_return_value(completion)
    rbd_aio_release(completion)
    context.onComplete(returnValue)
}

/// Starts an asynchronous librbd operation: `submit` passes a fresh completion to an `rbd_aio_*` call and
/// returns that call's result. `onComplete` gets the operation's return value (`-errno` on failure) exactly
/// once: from librbd's callback, or at once when the operation could not be submitted.
func startAsync(_ submit: (rbd_completion_t) -> Int32, onComplete: @escaping (Int) -> Void) {
    let context = Unmanaged.passRetained(CompletionContext(onComplete))
    var completion: rbd_completion_t?
    let created = rbd_aio_create_completion(context.toOpaque(), completionCallback, &completion)
    guard created >= 0 else {
        context.release()
        onComplete(Int(created))
        return
    }
    let submitted = submit(completion!)
    if submitted < 0 {
        rbd_aio_release(completion)
        context.release()
        onComplete(Int(submitted))
    }
}

/// A progress callback for calls that insist on one (`rbd_resize2`).
let ignoreProgress: librbd_progress_fn_t = { _, _, _ in 0 }
