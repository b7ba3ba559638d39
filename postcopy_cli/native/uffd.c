#include "uffd.h"

int pc_userfaultfd(int flags)
{
    int fd = (int)syscall(__NR_userfaultfd, flags);
    return fd < 0 ? -errno : fd;
}

/* /dev/userfaultfd hands out a uffd through an ioctl; access is governed by
 * the device node's permissions instead of vm.unprivileged_userfaultfd
 * (Documentation/admin-guide/mm/userfaultfd.rst). */
int pc_userfaultfd_dev(int flags)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    return fd < 0 ? -err : fd;
}

int pc_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

long pc_pagemap_scan(int pagemap_fd, struct pc_pm_scan_arg *arg)
{
    long r = ioctl(pagemap_fd, PC_PAGEMAP_SCAN, arg);
    return r < 0 ? -errno : r;
}
