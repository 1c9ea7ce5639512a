import Storage
import SystemPackage

extension StorageError {
    /// A failed librados/librbd call: they return `-errno` rather than setting `errno`.
    init(code: some BinaryInteger, operation: String, target: String) {
        self.init(Errno(rawValue: -CInt(truncatingIfNeeded: code)), operation: operation, target: target)
    }
}

/// Passes a librados/librbd return value through when it is not an error, and throws the errno a
/// negative one carries, naming the call and what it was called on (`pool/image@snap`).
@discardableResult
func check<Code: BinaryInteger>(
    _ code: Code, _ operation: String, _ target: @autoclosure () -> String
) throws -> Code {
    if code < 0 { throw StorageError(code: code, operation: operation, target: target()) }
    return code
}

/// The outcome of a wrapper of librados/librbd calls, which throw nothing but `StorageError`.
func storageResult<Value>(_ body: () throws -> Value) -> Result<Value, StorageError> {
    do {
        return .success(try body())
    } catch let error as StorageError {
        return .failure(error)
    } catch {
        preconditionFailure("librados/librbd wrappers throw only StorageError, not \(error)")
    }
}
