/* The target page: the unit of the migration stream's RAM records, requests
 * and bitmaps (DESIGN.md section 8; QEMU's TARGET_PAGE_SIZE on x86). The one
 * definition in C; Python's is codec.constants.TARGET_PAGE_SIZE (a test keeps
 * them equal). */
#ifndef POSTCOPY_PAGESIZE_H
#define POSTCOPY_PAGESIZE_H

#define PC_TARGET_PAGE_SIZE 4096ULL

#endif
