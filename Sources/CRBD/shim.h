#ifndef RBDFS_CRBD_SHIM_H
#define RBDFS_CRBD_SHIM_H
// librados / librbd have no pkg-config file on Debian; the module map links them by name.
#include <rados/librados.h>
#include <rbd/librbd.h>
#endif
