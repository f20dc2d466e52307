/*
 * Bit operations. The bit-scan and non-atomic set/clear helpers are the
 * kernel tree's own generic C versions (asm-generic/bitops/); only the bitmap
 * search below is written here, because the kernel's lives in lib/find_bit.c.
 */
#ifndef KC_BITOPS_H
#define KC_BITOPS_H

#include "types.h"

#define BIT(nr) (1UL << (nr))
#define BIT_ULL(nr) (1ULL << (nr))
#define BIT_MASK(nr) (1UL << ((nr) % BITS_PER_LONG))
#define BIT_WORD(nr) ((nr) / BITS_PER_LONG)
#define BITS_TO_LONGS(nr) DIV_ROUND_UP(nr, BITS_PER_BYTE * sizeof(long))
#define DECLARE_BITMAP(name, bits) unsigned long name[BITS_TO_LONGS(bits)]
#define GENMASK(h, l) (((~0UL) - (1UL << (l)) + 1) & (~0UL >> (BITS_PER_LONG - 1 - (h))))
#define GENMASK_ULL(h, l) (((~0ULL) - (1ULL << (l)) + 1) & (~0ULL >> (63 - (h))))

#define _LINUX_BITOPS_H
#include <asm-generic/bitops/__ffs.h>
#include <asm-generic/bitops/__fls.h>
#include <asm-generic/bitops/fls.h>
#include <asm-generic/bitops/fls64.h>
#include <asm-generic/bitops/generic-non-atomic.h>
/* fls_long() as <linux/bitops.h> defines it */
static inline unsigned int fls_long(unsigned long l)
{
	return fls64(l);
}
#define __set_bit(nr, addr) generic___set_bit(nr, addr)
#define __clear_bit(nr, addr) generic___clear_bit(nr, addr)
#define test_bit(nr, addr) generic_test_bit(nr, addr)

/* find_next_bit() as lib/find_bit.c defines it: the index of the first set
 * bit at or after @offset, or @size when there is none. */
static inline unsigned long kc_find_next_bit(const unsigned long *addr, unsigned long size,
					     unsigned long offset)
{
	unsigned long word;

	if (offset >= size)
		return size;
	word = addr[offset / BITS_PER_LONG] & (~0UL << (offset % BITS_PER_LONG));
	for (;;) {
		if (word) {
			offset = (offset & ~(BITS_PER_LONG - 1)) + __ffs(word);
			return offset < size ? offset : size;
		}
		offset = (offset | (BITS_PER_LONG - 1)) + 1;
		if (offset >= size)
			return size;
		word = addr[offset / BITS_PER_LONG];
	}
}
#define find_next_bit(addr, size, off) kc_find_next_bit((const unsigned long *)(addr), (size), (off))
#define find_first_bit(addr, size) kc_find_next_bit((const unsigned long *)(addr), (size), 0)
#define for_each_set_bit(bit, addr, size) \
	for ((bit) = find_first_bit((addr), (size)); (bit) < (size); \
	     (bit) = find_next_bit((addr), (size), (bit) + 1))

#endif
