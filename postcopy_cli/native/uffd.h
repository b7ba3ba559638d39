#ifndef POSTCOPY_UFFD_H
#define POSTCOPY_UFFD_H
#include "compat.h"

/* Every raw call returns >= 0 on success or -errno; the Python side turns
 * -errno into one exception type (postcopy_cli.uffd.errors). */
int pc_userfaultfd(int flags);
int pc_userfaultfd_dev(int flags);
int pc_ioctl(int fd, unsigned long request, void *arg);
long pc_pagemap_scan(int pagemap_fd, struct pc_pm_scan_arg *arg);
#endif
