/* Kernel ABI constants that the build machine's headers may lack.
 * Values are the kernel's own (include/uapi/linux/userfaultfd.h,
 * include/uapi/linux/fs.h as of Linux 6.8+); they are ABI and never change. */
#ifndef POSTCOPY_COMPAT_H
#define POSTCOPY_COMPAT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#ifndef __NR_userfaultfd
#define __NR_userfaultfd 323 /* x86_64 */
#endif

/* features added after the 6.1 uapi headers */
#ifndef UFFD_FEATURE_EXACT_ADDRESS
#define UFFD_FEATURE_EXACT_ADDRESS (1ULL << 11)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1ULL << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1ULL << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1ULL << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1ULL << 16)
#endif

/* ioctl numbers: _IOWR(0xAA, nr, struct) as in the uapi header */
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif

/* /dev/userfaultfd (Linux 6.1): USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00) */
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

/* PAGEMAP_SCAN (Linux 6.7, fs/proc/task_mmu.c; uapi linux/fs.h). Declared
 * here under our own names so that older headers build. */
#define PC_PAGEMAP_SCAN _IOWR('f', 16, struct pc_pm_scan_arg)
#define PC_PM_SCAN_WP_MATCHING (1ULL << 0)
#define PC_PM_SCAN_CHECK_WPASYNC (1ULL << 1)
#define PC_PAGE_IS_WPALLOWED (1ULL << 0)
#define PC_PAGE_IS_WRITTEN (1ULL << 1)
#define PC_PAGE_IS_FILE (1ULL << 2)
#define PC_PAGE_IS_PRESENT (1ULL << 3)
#define PC_PAGE_IS_SWAPPED (1ULL << 4)
#define PC_PAGE_IS_PFNZERO (1ULL << 5)
#define PC_PAGE_IS_HUGE (1ULL << 6)
#define PC_PAGE_IS_SOFT_DIRTY (1ULL << 7)

struct pc_page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

struct pc_pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

#endif
