#ifndef RBDFS_CFUSE_SHIM_H
#define RBDFS_CFUSE_SHIM_H
// 312, not 35: with 35, fuse_session_loop_mt is a function-like macro Swift cannot import.
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <sys/stat.h>
// Clients of a mount (rbdfs info) read its attributes through the ordinary syscalls.
#include <sys/xattr.h>

// FUSE_ARGS_INIT is a macro; Swift needs a function.
static inline struct fuse_args CFuse_args_init(int argc, char **argv) {
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    return args;
}
#endif
