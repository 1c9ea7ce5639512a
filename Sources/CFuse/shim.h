#ifndef RBDFS_CFUSE_SHIM_H
#define RBDFS_CFUSE_SHIM_H
// 312, not 35: with 35, fuse_session_loop_mt is a function-like macro Swift cannot import.
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdint.h>
// Clients of a mount (rbdfs info) read its attributes through the ordinary syscalls.
#include <sys/xattr.h>

// FUSE_ARGS_INIT is a macro; Swift needs a function.
static inline struct fuse_args CFuse_args_init(int argc, char **argv) {
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    return args;
}

// libfuse 3.14 has no fuse_file_info bit for FOPEN_PARALLEL_DIRECT_WRITES (kernel 6.2+), so this open reply
// is written here: the kernel's struct fuse_open_out (fh, open_flags, padding) sent as the reply's payload.
#define CFUSE_FOPEN_DIRECT_IO (1u << 0)
#define CFUSE_FOPEN_KEEP_CACHE (1u << 1)
#define CFUSE_FOPEN_PARALLEL_DIRECT_WRITES (1u << 6)
// glibc defines O_DIRECT only under _GNU_SOURCE, which Swift's Glibc module is not built with.
#if defined(O_DIRECT)
enum { CFUSE_O_DIRECT = O_DIRECT };
#elif defined(__aarch64__) || defined(__arm__) || defined(__powerpc__)
enum { CFUSE_O_DIRECT = 0200000 };
#else
enum { CFUSE_O_DIRECT = 040000 };
#endif
struct CFuse_open_out {
    uint64_t fh;
    uint32_t open_flags;
    uint32_t padding;
};
_Static_assert(sizeof(struct CFuse_open_out) == 16, "struct fuse_open_out is 16 bytes");
static inline int CFuse_reply_open_flags(fuse_req_t req, uint64_t fh, uint32_t open_flags) {
    struct CFuse_open_out out = { fh, open_flags, 0 };
    struct iovec iov = { &out, sizeof out };
    return fuse_reply_iov(req, &iov, 1);
}
#endif
