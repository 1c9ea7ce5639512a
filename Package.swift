// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "rbdfs",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "rbdfs", targets: ["rbdfs"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
    ],
    targets: [
        // C: librados/librbd (no .pc on Debian; linked by name in the module map) and libfuse3.
        .systemLibrary(name: "CRBD", path: "Sources/CRBD"),
        .systemLibrary(name: "CFuse", path: "Sources/CFuse", pkgConfig: "fuse3"),

        // The storage protocol the filesystem talks to: pools, namespaces, images, snapshots, async I/O.
        .target(name: "Storage", dependencies: [
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // The same protocol in memory, with fault injection: unit tests and demos, no I/O.
        .target(name: "MemoryStore", dependencies: ["Storage"]),
        // The protocol on librados/librbd: the only place librbd return codes become Swift errors.
        .target(name: "RBD", dependencies: [
            "CRBD", "Storage",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // The filesystem: names, inodes, conventions, the I/O engine, the one errno mapping. No C, no FUSE.
        .target(name: "RBDFS", dependencies: [
            "Storage",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // A thin adapter from the libfuse3 low-level API to RBDFS.
        .target(name: "FUSE", dependencies: [
            "CFuse", "RBDFS", "Storage",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "rbdfs", dependencies: [
            "RBD", "RBDFS", "FUSE", "Storage",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),

        .testTarget(name: "RBDFSTests", dependencies: ["RBDFS", "MemoryStore", "Storage"]),
        .testTarget(name: "MemoryStoreTests", dependencies: ["MemoryStore", "Storage"]),
        // The Ceph store against a real local cluster (RBDFS_TEST_CEPH_CONF), no mount.
        .testTarget(name: "RBDTests", dependencies: [
            "RBD", "Storage",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // The mounted filesystem against a real local cluster, checked with rbd, dd, cp, stat, ...
        .testTarget(name: "IntegrationTests", dependencies: []),
    ],
    swiftLanguageModes: [.v5]
)
