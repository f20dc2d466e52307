/*
 * Probe of the harness's kernel stand-ins: built exactly like the kernel unit
 * (-nostdinc, the staged tree headers forwarded to conformance/shims/kc), it
 * wraps each helper in an exported kc_test_* function that shim_main.c (built
 * against libc) calls. Arguments arrive at run time, so nothing here is
 * constant-folded: the probe sees the code paths the KHO code gets.
 */
#include <linux/types.h>
#include <linux/bitops.h>
#include <linux/count_zeros.h>
#include <linux/log2.h>
#include <linux/err.h>
#include <linux/math.h>
#include <linux/minmax.h>
#include <linux/unaligned.h>
#include <linux/mm.h>

#define PROBE noinline __attribute__((visibility("default")))

PROBE unsigned long kc_test_page_shift(void) { return PAGE_SHIFT; }

/* bitmap search */
PROBE unsigned long kc_test_find_next_bit(const unsigned long *addr, unsigned long size, unsigned long off)
{
	return find_next_bit(addr, size, off);
}
PROBE unsigned long kc_test_find_first_bit(const unsigned long *addr, unsigned long size)
{
	return find_first_bit(addr, size);
}
PROBE unsigned long kc_test_for_each_set_bit(const unsigned long *addr, unsigned long size,
					     unsigned long *out, unsigned long max)
{
	unsigned long bit, n = 0;

	for_each_set_bit(bit, addr, size) {
		if (n < max)
			out[n] = bit;
		n++;
	}
	return n;
}

/* bit scans: the kernel tree's own generic versions, plus the shim's fls_long */
PROBE unsigned long kc_test_fls_long(unsigned long x) { return fls_long(x); }
PROBE unsigned long kc_test_fls64(unsigned long long x) { return (unsigned long)fls64(x); }
PROBE unsigned long kc_test_fls(unsigned int x) { return (unsigned long)fls(x); }
PROBE unsigned long kc_test___ffs(unsigned long x) { return __ffs(x); }
PROBE unsigned long kc_test___fls(unsigned long x) { return __fls(x); }
PROBE long kc_test_count_trailing_zeros(unsigned long x) { return count_trailing_zeros(x); }
PROBE long kc_test_ilog2(unsigned long x) { return ilog2(x); }
PROBE long kc_test_ilog2_u32(unsigned int x) { return ilog2(x); }

/* arithmetic */
PROBE unsigned long kc_test_round_up(unsigned long x, unsigned long y) { return round_up(x, y); }
/* round_up with a narrower x than y: the kernel's mask is (typeof(x))(y - 1) */
PROBE unsigned long kc_test_round_up_u32(unsigned int x, unsigned long y) { return round_up(x, y); }
PROBE unsigned long kc_test_div_round_up(unsigned long n, unsigned long d) { return DIV_ROUND_UP(n, d); }
PROBE unsigned long kc_test_min(unsigned long a, unsigned long b) { return min(a, b); }
PROBE unsigned long kc_test_max(unsigned long a, unsigned long b) { return max(a, b); }
PROBE long kc_test_min_signed(long a, long b) { return min(a, b); }
PROBE long kc_test_max_signed(long a, long b) { return max(a, b); }
PROBE unsigned long kc_test_min_t_u32(unsigned long a, unsigned long b) { return min_t(u32, a, b); }
PROBE unsigned long kc_test_max_t_u32(unsigned long a, unsigned long b) { return max_t(u32, a, b); }

/* page allocator sizing */
PROBE long kc_test_get_order(unsigned long size) { return get_order(size); }
PROBE long kc_test_kc_get_order(unsigned long size) { return kc_get_order(size); }

/* unaligned load */
PROBE unsigned long long kc_test_get_unaligned(const void *p) { return get_unaligned((const u64 *)p); }

/* bit masks */
PROBE unsigned long kc_test_bit_mask(unsigned long nr) { return BIT_MASK(nr); }
PROBE unsigned long kc_test_bit_word(unsigned long nr) { return BIT_WORD(nr); }
PROBE unsigned long kc_test_genmask(unsigned long h, unsigned long l) { return GENMASK(h, l); }
PROBE unsigned long long kc_test_genmask_ull(unsigned long h, unsigned long l) { return GENMASK_ULL(h, l); }
PROBE unsigned long kc_test_bits_to_longs(unsigned long nr) { return BITS_TO_LONGS(nr); }
PROBE unsigned long kc_test_bit(unsigned long nr) { return BIT(nr); }

/* error pointers */
PROBE unsigned long kc_test_err_ptr(long err) { return (unsigned long)ERR_PTR(err); }
PROBE long kc_test_ptr_err(unsigned long p) { return PTR_ERR((const void *)p); }
PROBE long kc_test_is_err(unsigned long p) { return IS_ERR((const void *)p); }
PROBE long kc_test_is_err_or_null(unsigned long p) { return IS_ERR_OR_NULL((const void *)p); }
PROBE long kc_test_is_err_value(unsigned long x) { return IS_ERR_VALUE(x); }

/* the tree's non-atomic bit ops, through the shim's names */
PROBE unsigned long kc_test_set_clear_test_bit(unsigned long *addr, unsigned long nr, unsigned long set)
{
	if (set)
		__set_bit(nr, addr);
	else
		__clear_bit(nr, addr);
	return test_bit(nr, addr);
}
