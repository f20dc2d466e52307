/*
 * Driver for shim_probe.c: reads one query per line on stdin, prints one
 * result line per query. Numbers are C integer literals (strtoull base 0);
 * byte strings are hex.
 *
 *   <unary-fn> x             -> r            (see the table below)
 *   <binary-fn> x y          -> r
 *   find_next_bit size off w0 w1 ...  (the words are laid out to end exactly
 *                            at a PROT_NONE page: any read past them faults)
 *   find_first_bit size w0 ...
 *   for_each_set_bit size w0 ...      -> count b0 b1 ...
 *   get_unaligned hexbytes off        -> the u64 at byte offset off
 *   strscpy hexsrc n fill             -> rc hexdest (dest: 80 bytes of fill)
 *   set_clear_test_bit nr set w0 ...  -> test_bit words...
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kc_runtime.h"

#define X(ret, name, ...) ret kc_test_##name(__VA_ARGS__);
X(unsigned long, page_shift, void)
X(unsigned long, find_next_bit, const unsigned long *, unsigned long, unsigned long)
X(unsigned long, find_first_bit, const unsigned long *, unsigned long)
X(unsigned long, for_each_set_bit, const unsigned long *, unsigned long, unsigned long *, unsigned long)
X(unsigned long, fls_long, unsigned long)
X(unsigned long, fls64, unsigned long long)
X(unsigned long, fls, unsigned int)
X(unsigned long, __ffs, unsigned long)
X(unsigned long, __fls, unsigned long)
X(long, count_trailing_zeros, unsigned long)
X(long, ilog2, unsigned long)
X(long, ilog2_u32, unsigned int)
X(unsigned long, round_up, unsigned long, unsigned long)
X(unsigned long, round_up_u32, unsigned int, unsigned long)
X(unsigned long, div_round_up, unsigned long, unsigned long)
X(unsigned long, min, unsigned long, unsigned long)
X(unsigned long, max, unsigned long, unsigned long)
X(long, min_signed, long, long)
X(long, max_signed, long, long)
X(unsigned long, min_t_u32, unsigned long, unsigned long)
X(unsigned long, max_t_u32, unsigned long, unsigned long)
X(long, get_order, unsigned long)
X(long, kc_get_order, unsigned long)
X(unsigned long long, get_unaligned, const void *)
X(unsigned long, bit_mask, unsigned long)
X(unsigned long, bit_word, unsigned long)
X(unsigned long, genmask, unsigned long, unsigned long)
X(unsigned long long, genmask_ull, unsigned long, unsigned long)
X(unsigned long, bits_to_longs, unsigned long)
X(unsigned long, bit, unsigned long)
X(unsigned long, err_ptr, long)
X(long, ptr_err, unsigned long)
X(long, is_err, unsigned long)
X(long, is_err_or_null, unsigned long)
X(long, is_err_value, unsigned long)
X(unsigned long, set_clear_test_bit, unsigned long *, unsigned long, unsigned long)
#undef X

#define MAXW 64
static unsigned char *guard_area; /* one RW page followed by a PROT_NONE page */
static long page;

/* the words placed to end exactly where the PROT_NONE page begins */
static unsigned long *guarded(const unsigned long *w, unsigned long n)
{
	unsigned long *p = (unsigned long *)(guard_area + page) - n;

	memcpy(p, w, n * sizeof(*w));
	return p;
}

static unsigned long num(const char *s)
{
	return strtoull(s, NULL, 0);
}

static int unhex(const char *s, unsigned char *out, int max)
{
	int n = 0;

	if (!strcmp(s, "-"))
		return 0;
	while (s[0] && s[1] && n < max) {
		unsigned int b;

		sscanf(s, "%2x", &b);
		out[n++] = b;
		s += 2;
	}
	return n;
}

int main(void)
{
	char line[8192];

	page = sysconf(_SC_PAGESIZE);
	guard_area = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (guard_area == MAP_FAILED || mprotect(guard_area + page, page, PROT_NONE))
		return 2;
	setvbuf(stdout, NULL, _IOFBF, 1 << 16);
	while (fgets(line, sizeof(line), stdin)) {
		char *tok[MAXW + 8];
		int n = 0;

		for (char *t = strtok(line, " \n"); t && n < MAXW + 8; t = strtok(NULL, " \n"))
			tok[n++] = t;
		if (!n)
			continue;
		const char *f = tok[0];
		unsigned long a = n > 1 ? num(tok[1]) : 0, b = n > 2 ? num(tok[2]) : 0;

#define U1(name) if (!strcmp(f, #name)) { printf("%llu\n", (unsigned long long)kc_test_##name(a)); continue; }
#define S1(name) if (!strcmp(f, #name)) { printf("%lld\n", (long long)kc_test_##name(a)); continue; }
#define U2(name) if (!strcmp(f, #name)) { printf("%llu\n", (unsigned long long)kc_test_##name(a, b)); continue; }
#define S2(name) if (!strcmp(f, #name)) { printf("%lld\n", (long long)kc_test_##name((long)a, (long)b)); continue; }
		if (!strcmp(f, "page_shift")) { printf("%lu\n", kc_test_page_shift()); continue; }
		U1(fls_long) U1(fls64) U1(__ffs) U1(__fls) S1(count_trailing_zeros) S1(ilog2)
		U1(bit_mask) U1(bit_word) U1(bits_to_longs) U1(bit) U1(err_ptr) S1(ptr_err) S1(is_err)
		S1(is_err_or_null) S1(is_err_value) S1(get_order) S1(kc_get_order)
		U2(round_up) U2(div_round_up) U2(min) U2(max) S2(min_signed) S2(max_signed) U2(min_t_u32)
		U2(max_t_u32) U2(genmask) U2(genmask_ull)
		if (!strcmp(f, "fls")) { printf("%lu\n", kc_test_fls((unsigned int)a)); continue; }
		if (!strcmp(f, "ilog2_u32")) { printf("%ld\n", kc_test_ilog2_u32((unsigned int)a)); continue; }
		if (!strcmp(f, "round_up_u32")) { printf("%lu\n", kc_test_round_up_u32((unsigned int)a, b)); continue; }
		if (!strcmp(f, "find_next_bit") || !strcmp(f, "find_first_bit") || !strcmp(f, "for_each_set_bit")) {
			int first = strcmp(f, "find_next_bit") ? 2 : 3;
			unsigned long w[MAXW], nw = 0, *p, bits[MAXW * 64];

			for (int i = first; i < n; i++)
				w[nw++] = num(tok[i]);
			p = guarded(w, nw);
			if (!strcmp(f, "find_next_bit")) {
				printf("%lu\n", kc_test_find_next_bit(p, a, b));
			} else if (!strcmp(f, "find_first_bit")) {
				printf("%lu\n", kc_test_find_first_bit(p, a));
			} else {
				unsigned long c = kc_test_for_each_set_bit(p, a, bits, MAXW * 64);

				printf("%lu", c);
				for (unsigned long i = 0; i < c && i < MAXW * 64; i++)
					printf(" %lu", bits[i]);
				printf("\n");
			}
			continue;
		}
		if (!strcmp(f, "set_clear_test_bit")) {
			unsigned long w[MAXW], nw = 0, r;

			for (int i = 3; i < n; i++)
				w[nw++] = num(tok[i]);
			r = kc_test_set_clear_test_bit(w, a, b);
			printf("%lu", r);
			for (unsigned long i = 0; i < nw; i++)
				printf(" %lu", w[i]);
			printf("\n");
			continue;
		}
		if (!strcmp(f, "get_unaligned")) {
			unsigned char buf[64];

			unhex(tok[1], buf, sizeof(buf));
			printf("%llu\n", kc_test_get_unaligned(buf + b));
			continue;
		}
		if (!strcmp(f, "strscpy")) {
			/* src is placed to end at the PROT_NONE page (with its NUL
			 * unless the query omits it), so reading past it faults */
			unsigned char src[4096], dest[80];
			int len = unhex(tok[1], src, sizeof(src));
			char *s = (char *)guard_area + page - len;
			long rc;

			memcpy(s, src, len);
			memset(dest, (int)num(tok[3]), sizeof(dest));
			rc = kc_strscpy((char *)dest, s, b);
			printf("%ld ", rc);
			for (unsigned i = 0; i < sizeof(dest); i++)
				printf("%02x", dest[i]);
			printf("\n");
			continue;
		}
		if (!strcmp(f, "kvmalloc_store")) {
			/* store one pointer at index b of a fresh kvmalloc'd array of a pointers */
			void **array = kc_kvmalloc_array(a, sizeof(void *));

			fflush(stdout);
			array[b] = array;
			printf("%lu\n", ((unsigned long *)array)[-2]);
			kc_kvfree(array);
			continue;
		}
		printf("?\n");
	}
	return 0;
}
