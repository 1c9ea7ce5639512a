import Storage
import SystemPackage

/// A failure the test asked for: the next `remaining` calls of `operation` (on `image`, if given) fail
/// with `errno`, in the spirit of mountpoint-s3's failure client.
struct InjectedFault {
    var errno: Errno
    var operation: String
    var image: String?
    var remaining: Int

    /// A fault on `rbd_open` also hits read-only opens, so one fault covers "opening fails" whatever the mode.
    func matches(operation call: String, spec: ImageSpec?, target: String) -> Bool {
        guard operation == call || (operation == "rbd_open" && call == "rbd_open_read_only") else {
            return false
        }
        guard let image else { return true }
        if let spec, image == spec.name || image == spec.description { return true }
        return image == target
    }
}
